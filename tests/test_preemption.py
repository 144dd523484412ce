"""Stopping a run on time, on a pod: SIGTERM to one of two processes, the non-finite stop policy, and SIGTERM while
the main thread is stuck inside XLA. Each runs the real `meshforge` command in subprocesses."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO, checkpoint_state, cli_env, free_port, start_meshforge

# log_every far beyond the run: decisions must not wait for a log step
ARGS = ["experiments/shakespeare_char.py", "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
        "--train.seq_len", "16", "--train.batch_size", "8", "--train.log_every", "1000", "--train.eval_every", "0",
        "--train.eval_batches", "1", "--log.progress", "none", "--mesh.fsdp", "4", "--mesh.data", "1",
        "--optim.decay_steps", "1000"]


def two_processes(workdir, *extra, faults: tuple[str, str] = ("", "")) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process of a 2-process run (2 fake CPU devices each)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", "train", *ARGS, *map(str, extra), "--workdir",
                               str(workdir), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)],
                              env={**cli_env(2), "MESHFORGE_FAULTS": faults[i]}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def params_at(workdir, step):
    """The parameters of a checkpoint, onto one device (it may have been written by several processes)."""
    return checkpoint_state(workdir, step)["params"]


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    import jax
    import numpy as np

    run = tmp_path / "preempted"
    # Process 1 alone is signalled, at step 20 of 60; no periodic checkpoints, no log step before the end.
    outs = two_processes(run, "--train.steps", 60, "--train.checkpoint_every", 0, "--train.preempt_grace_s", 60,
                         faults=("", "sigterm_at_step=20"))
    for rc, err in outs:
        assert rc == 0, err
    assert "preempted: checkpoint at step" in outs[0][1], outs[0][1]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 20 < steps[0] < 60, steps  # one checkpoint, taken soon after the signal
    shards = {p.name for p in (run / "checkpoints" / str(steps[0]) / "state").iterdir() if p.name.startswith("ocdbt")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}  # both processes saved that same step
    assert json.loads((run / "summary.json").read_text())["preempted"]

    for rc, err in two_processes(run, "--train.steps", 60, "--train.checkpoint_every", 0):
        assert rc == 0, err
    straight = tmp_path / "straight"
    for rc, err in two_processes(straight, "--train.steps", 60, "--train.checkpoint_every", 0):
        assert rc == 0, err
    for a, b in zip(jax.tree.leaves(params_at(run, 60)), jax.tree.leaves(params_at(straight, 60))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # exact resume


def test_nonfinite_stop_acts_at_once_on_every_process(tmp_path):
    run = tmp_path / "nan"
    faults = "nan_at_step=5"  # the batch of step 6 is non-finite on both processes (every host reads its rows)
    outs = two_processes(run, "--train.steps", 60, "--train.checkpoint_every", 2, "--train.nonfinite", "stop",
                         faults=(faults, faults))
    for rc, err in outs:
        assert rc == 1 and "Traceback" not in err, err
        assert "non-finite loss or gradients at step 6" in err.strip().splitlines()[-1]
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) <= 6 + 5, saved  # halted within the few steps in flight, not at the next log step
    assert not (run / "summary.json").exists()


def test_sigterm_while_the_main_thread_is_stuck_in_xla_exits_within_the_grace_period(tmp_path):
    run = tmp_path / "hung"
    proc = start_meshforge("train", *ARGS, "--mesh.fsdp", "1", "--mesh.data", "-1", "--train.steps", "100",
                           "--train.checkpoint_every", "10", "--train.preempt_grace_s", "5", "--workdir", run,
                           devices=2, env={"MESHFORGE_FAULTS": "hang_at_step=15"})
    err = wait_for_hang(proc)
    took = sigterm_and_wait(proc, 30)
    err += proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 4.0 <= took < 15.0, took  # the watchdog's grace period, not a hang and not at once
    assert "grace period of 5s ran out" in err
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [10]  # the checkpoint taken before the hang is intact
    params_at(run, 10)


GUARDED_HANG = """
from train.faults import _hang
from train.preemption import PreemptionGuard

with PreemptionGuard(3):
    _hang()
"""


def wait_for_hang(proc: subprocess.Popen, limit: float = 240) -> str:
    """stderr up to the fault's line saying the main thread is now blocked inside XLA (read by a thread, so a
    child that never gets there fails the test instead of blocking it)."""
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "fault: hanging" in line:
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(limit):
        proc.kill()
        pytest.fail("the fault never blocked:\n" + "".join(lines))
    time.sleep(1.0)  # well inside the never-ending computation
    return "".join(lines)


def sigterm_and_wait(proc: subprocess.Popen, limit: float) -> float:
    """Seconds from SIGTERM to exit; fails if the process outlives the limit."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM was ignored while the main thread waited inside XLA")
    return time.monotonic() - t0


def test_the_guard_notices_sigterm_while_blocked_inside_a_device_computation():
    """The mechanism alone: the main thread blocked in XLA, where it never runs a Python signal handler."""
    proc = subprocess.Popen([sys.executable, "-c", GUARDED_HANG], env=cli_env(1), cwd=REPO, text=True,
                            stderr=subprocess.PIPE)
    err = wait_for_hang(proc)
    took = sigterm_and_wait(proc, 30)
    err += proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM and "grace period of 3s ran out" in err, err
    assert 2.5 <= took < 15, took

"""Reliability: exact resume after SIGKILL, SIGTERM preemption, non-finite steps, corrupt checkpoints, locks,
storage failures, model-shape changes. Each runs the real `meshforge` command in a subprocess."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import logged_losses as losses
from helpers import meshforge, start_meshforge, tree_digest

EXPERIMENT = "experiments/shakespeare_char.py"
TINY = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--train.seq_len", "16",
        "--train.batch_size", "4", "--train.eval_every", "0", "--train.eval_batches", "1", "--log.progress", "none",
        "--optim.decay_steps", "1000"]


def final_params(workdir, step):
    mgr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "extra"))
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    return state["params"]


def assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_with_faults(args, faults):
    return meshforge(*args, devices=2, env={"MESHFORGE_FAULTS": faults})


def run60(workdir) -> list:
    """The arguments of the 60-step run, logging every step, checkpoints every 30 (of `straight` and its reruns)."""
    return ["train", EXPERIMENT, "--workdir", workdir, "--train.steps", "60", "--train.log_every", "1",
            "--train.checkpoint_every", "30", *TINY]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 60-step run, logging every step, checkpoints every 30."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    r = meshforge(*run60(workdir), devices=2)
    assert r.returncode == 0, r.stderr
    return workdir


@pytest.mark.compat
def test_sigkill_then_resume_is_bitwise_identical(straight, tmp_path):
    workdir = tmp_path / "killed"
    args = run60(workdir)
    r = run_with_faults(args, "kill_at_step=34")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (workdir / "summary.json").exists()
    r = meshforge(*args, devices=2)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 30" in r.stderr  # the checkpoint at 30 had finished before the kill at 34
    got, want = losses(workdir), losses(straight)
    assert sorted(got) == list(range(1, 61))
    assert [got[s] for s in range(31, 61)] == [want[s] for s in range(31, 61)]  # exact, not approximate
    assert_trees_equal(final_params(workdir, 60), final_params(straight, 60))


def test_kill_during_a_checkpoint_write_never_resumes_from_it(straight, tmp_path):
    """Killed right after the save at step 30 began: a half-written checkpoint is never picked up."""
    workdir = tmp_path / "killed_hard"
    args = run60(workdir)
    r = run_with_faults(args, "kill_hard_at_step=31")
    assert r.returncode == -signal.SIGKILL, r.stderr
    # Orbax writes into a temporary folder and renames it to checkpoints/30 only once the save is complete.
    committed = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert committed in ([], ["30"]), committed
    r = meshforge(*args, devices=2)
    assert r.returncode == 0, r.stderr
    if committed:  # the save finished before the kill: it must be used
        assert "resuming at step 30" in r.stderr and "new run" not in r.stderr, r.stderr
    else:  # only a half-written save: never picked up, the run starts over
        assert "new run" in r.stderr and "resuming at" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert losses(workdir) == losses(straight)
    assert_trees_equal(final_params(workdir, 60), final_params(straight, 60))


# What else a resume must restore exactly: the packed pipeline's position and shuffle, per-micro-batch dropout
# keys, the MoE router's state. Dropout is on in all three, so every step's key must come back too.
RESUME_CASES = {
    "packed, dropout": ["--data.mode", "packed", "--data.split_by", "paragraph", "--model.dropout", "0.1"],
    "accumulation, dropout": ["--optim.accum_steps", "2", "--model.dropout", "0.1"],
    "moe, dropout": ["--model.moe_experts", "4", "--model.moe_top_k", "2", "--model.moe_d_ff", "64",
                     "--model.dropout", "0.1"],
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_sigkill_mid_save_then_resume_is_bitwise_identical(case, tmp_path_factory):
    """Killed while the checkpoint of step 20 is half-written (no waiting for the save): the rerun resumes from
    the last committed checkpoint, 10, and reproduces the uninterrupted run's steps 11..30 to the bit."""
    root = tmp_path_factory.mktemp("resume")
    args = lambda workdir: ["train", EXPERIMENT, "--workdir", workdir, "--train.steps", "30",  # noqa: E731
                            "--train.log_every", "1", "--train.checkpoint_every", "10", *TINY,
                            "--data.cache_dir", root / "cache", *RESUME_CASES[case]]
    straight, killed = root / "straight", root / "killed"
    r = meshforge(*args(straight), devices=2)
    assert r.returncode == 0, r.stderr
    r = run_with_faults(args(killed), "kill_in_save_at_step=20")
    assert r.returncode == -signal.SIGKILL, r.stderr
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names[0] == "10" and names[1].startswith("20.") and len(names) == 2, names  # 20: written, not committed
    r = meshforge(*args(killed), devices=2)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 10" in r.stderr and "Traceback" not in r.stderr, r.stderr
    got, want = losses(killed), losses(straight)
    assert sorted(got) == list(range(1, 31))
    assert got == want  # exact, not approximate: 1..10 from before the kill, 11..30 from the resumed run
    assert_trees_equal(final_params(killed, 30), final_params(straight, 30))


def _wait_for_metrics(workdir, proc, n=3, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    raise AssertionError("the run did not start logging")


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "preempted"
    args = ["train", EXPERIMENT, "--workdir", workdir, "--train.steps", "100000", "--train.log_every", "1",
            "--train.checkpoint_every", "0", "--train.preempt_grace_s", "60", *TINY]
    proc = start_meshforge(*args, devices=2)
    _wait_for_metrics(workdir, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    summary = json.loads((workdir / "summary.json").read_text())
    reached = summary["last_step"]
    assert summary["preempted"] and (workdir / "checkpoints" / str(reached)).is_dir()
    total = reached + 5
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", total, "--train.log_every", "1",
                  "--train.checkpoint_every", "0", *TINY, devices=2)
    assert r.returncode == 0 and f"resuming at step {reached}" in r.stderr, r.stderr
    ref = tmp_path / "reference"
    r = meshforge("train", EXPERIMENT, "--workdir", ref, "--train.steps", total, "--train.log_every", "1",
                  "--train.checkpoint_every", "0", *TINY, devices=2)
    assert r.returncode == 0, r.stderr
    assert losses(workdir) == losses(ref)
    assert_trees_equal(final_params(workdir, total), final_params(ref, total))


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    workdir = tmp_path / "nan"
    args = ["train", EXPERIMENT, "--workdir", workdir, "--train.steps", "20", "--train.log_every", "1", *TINY]
    r = run_with_faults(args, "nan_at_step=12")
    assert r.returncode == 0, r.stderr
    assert "step 13: non-finite" in r.stderr  # batch index 12 is the 13th step
    rows = {row["step"]: row for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}
    assert rows[13]["loss"] is None and rows[12]["skipped_steps"] == 0 and rows[20]["skipped_steps"] == 1
    assert all(rows[s]["loss"] is not None for s in rows if s != 13)
    assert json.loads((workdir / "summary.json").read_text())["skipped_steps"] == 1

    r = run_with_faults([*args, "--train.nonfinite", "stop", "--workdir", tmp_path / "nan_stop"], "nan_at_step=12")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "non-finite loss or gradients at step 13" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path, damage):
    workdir = tmp_path / "corrupt"
    shutil.copytree(straight, workdir)
    files = sorted((workdir / "checkpoints" / "60" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        biggest = [p for p in files if p.is_file()][-1]
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    else:
        for p in (workdir / "checkpoints" / "60" / "state").rglob("manifest.ocdbt"):
            p.unlink()
    r = meshforge(*run60(workdir), devices=2)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "checkpoint 60 is unreadable" in warnings[0] and "from step 30" in warnings[0]
    assert "Traceback" not in r.stderr
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1
    assert losses(workdir) == losses(straight)  # the rerun of 31..60 reproduces the lost steps exactly


def test_second_run_on_a_workdir_is_refused(tmp_path):
    workdir = tmp_path / "locked"
    args = ["train", EXPERIMENT, "--workdir", workdir, "--train.steps", "100000", "--train.log_every", "1",
            "--train.checkpoint_every", "0", *TINY]
    first = start_meshforge(*args, devices=2)
    _wait_for_metrics(workdir, first)
    second = meshforge(*args, devices=2)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another meshforge run" in lines[0] and f"pid {first.pid}" in lines[0]
    _wait_for_metrics(workdir, first, n=len((workdir / "metrics.jsonl").read_text().splitlines()) + 3)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=90)
    assert first.returncode == 0, err


def test_model_change_is_refused_and_fresh_archives(straight, tmp_path):
    workdir = tmp_path / "changed"
    shutil.copytree(straight, workdir)
    before = tree_digest(workdir)
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", "70", *TINY, "--model.d_model", "64",
                  devices=2)
    assert r.returncode == 2 and "model.d_model: 32 -> 64" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert tree_digest(workdir) == before
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", "5", *TINY, "--model.d_model", "64",
                  "--fresh", devices=2)
    assert r.returncode == 0, r.stderr
    archived = list((workdir / "archive").iterdir())
    assert len(archived) == 1 and (archived[0] / "checkpoints" / "60").is_dir()
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 64


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = meshforge("train", EXPERIMENT, "--workdir", blocker / "run", "--train.steps", "5", *TINY, devices=2)
    assert r.returncode == 2 and "not writable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _mount_tmpfs(path, size_kb):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_keeps_the_last_checkpoint(straight, tmp_path):
    mnt = tmp_path / "small_disk"
    used = sum(p.stat().st_size for p in straight.rglob("*") if p.is_file()) // 1024
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, used + 160):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        workdir = mnt / "run"
        shutil.copytree(straight, workdir)
        r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", "300", "--train.log_every", "10",
                      "--train.checkpoint_every", "10", "--train.keep_checkpoints", "100", *TINY, devices=2)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert "No space left on device" in lines[-1] and "Traceback" not in r.stderr
        last = int(lines[-1].split("the last valid checkpoint is step ")[1].split(".")[0])
        assert last >= 60
        final_params(workdir, last)  # the last valid checkpoint still restores
    finally:
        subprocess.run(["umount", str(mnt)])

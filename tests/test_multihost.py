"""Two cooperating processes (jax.distributed on CPU, 2 fake devices each) train like one process with 4 devices,
their checkpoint restores in a single process, and they fall back together from a damaged latest checkpoint."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, cli_env, free_port, meshforge

pytestmark = pytest.mark.compat  # also run on the newest supported stack (.ci/run)

ARGS = ["experiments/shakespeare_char.py", "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
        "--train.seq_len", "16", "--train.batch_size", "8", "--train.steps", "10", "--train.log_every", "1",
        "--train.eval_every", "0", "--train.eval_batches", "2", "--log.progress", "none", "--mesh.data", "1",
        "--mesh.fsdp", "4", "--train.checkpoint_every", "5"]


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train_two_processes(workdir) -> list[str]:
    """stderr of each process; both must succeed."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", "train", *ARGS, "--workdir", str(workdir),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=cli_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [err for _, err in outs]


def test_two_processes_match_one(tmp_path):
    multi, single = tmp_path / "two_procs", tmp_path / "one_proc"
    outs = [(None, err) for err in _train_two_processes(multi)]
    assert "processes 2" in outs[0][1] and "done:" not in outs[1][1]  # only process 0 reports
    shards = {p.name for p in (multi / "checkpoints" / "10" / "state").iterdir() if p.name.startswith("ocdbt")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}  # every process wrote its own shards

    r = meshforge("train", *ARGS, "--workdir", single, devices=4)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    # Energy accounting counts a machine's CPU once, however many processes run on it: both processes here share
    # this host's cores, so they count the chip-hours per wall second of one process.
    per_s = [(s := json.loads((w / "summary.json").read_text()))["chip_hours"] / s["wall_s"] for w in (multi, single)]
    assert 0.7 < per_s[0] / per_s[1] < 1.4, per_s

    # The 2-process checkpoint restores in one process (here a single device).
    evals = [meshforge("eval", "--workdir", w, "--mesh.fsdp", "1", "--mesh.data", "-1", devices=1) for w in (multi, single)]
    for e in evals:
        assert e.returncode == 0, e.stderr
    a, b = (json.loads(e.stdout)["val_loss"] for e in evals)
    assert abs(a - b) <= 1e-5 * abs(b)

    # A truncated latest checkpoint: both processes skip it together, resume from step 5 and redo 6..10 exactly.
    damaged = tmp_path / "damaged"
    shutil.copytree(multi, damaged)
    files = [p for p in (damaged / "checkpoints" / "10" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    errs = _train_two_processes(damaged)
    warnings = [ln for ln in errs[0].splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "checkpoint 10 is unreadable" in warnings[0] and "from step 5" in warnings[0], errs[0]
    assert not [ln for ln in errs[1].splitlines() if "warning" in ln]  # only process 0 reports
    assert len(list((damaged / "corrupt_checkpoints").iterdir())) == 1
    assert _losses(damaged) == _losses(multi)

"""Two cooperating processes (jax.distributed on CPU, 2 fake devices each) train like one process with 4 devices,
and their checkpoint restores in a single process."""
import json
import socket
import subprocess
import sys

import numpy as np

from helpers import REPO, cli_env, meshforge

ARGS = ["experiments/shakespeare_char.py", "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
        "--train.seq_len", "16", "--train.batch_size", "8", "--train.steps", "10", "--train.log_every", "1",
        "--train.eval_every", "0", "--train.eval_batches", "2", "--log.progress", "none", "--mesh.data", "1",
        "--mesh.fsdp", "4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one(tmp_path):
    multi, single = tmp_path / "two_procs", tmp_path / "one_proc"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "train.cli", "train", *ARGS, "--workdir", str(multi),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=cli_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "processes 2" in outs[0][1] and "done:" not in outs[1][1]  # only process 0 reports
    shards = {p.name for p in (multi / "checkpoints" / "10" / "state").iterdir() if p.name.startswith("ocdbt")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}  # every process wrote its own shards

    r = meshforge("train", *ARGS, "--workdir", single, devices=4)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)

    # The 2-process checkpoint restores in one process (here a single device).
    evals = [meshforge("eval", "--workdir", w, "--mesh.fsdp", "1", "--mesh.data", "-1", devices=1) for w in (multi, single)]
    for e in evals:
        assert e.returncode == 0, e.stderr
    a, b = (json.loads(e.stdout)["val_loss"] for e in evals)
    assert abs(a - b) <= 1e-5 * abs(b)

"""End to end through the `meshforge` command: train, resume, eval, sample, and bad input."""
import json
import shutil

import pytest

from helpers import meshforge, tree_digest

TINY_RUN = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--train.seq_len", "16",
            "--train.batch_size", "4", "--train.eval_every", "10", "--train.eval_batches", "2",
            "--train.checkpoint_every", "10", "--train.log_every=5", "--log.progress", "lines"]
EXPERIMENT = "experiments/shakespeare_char.py"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "tiny"
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", "20", *TINY_RUN, devices=2)
    assert r.returncode == 0, r.stderr
    return workdir


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_the_run_files(run_dir):
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    assert any((run_dir / "tb").iterdir())
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["vocab_size"] == 128 and cfg["name"] == "shakespeare_char"
    rows = _rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for r in train_rows:
        assert {"loss", "grad_norm", "lr", "tokens_per_s", "step_ms", "mfu"} <= set(r)
        assert 0 < r["mfu"] < 1
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["tokens_this_run"] == 20 * 4 * 16
    assert summary["final_val_loss"] < 4.9  # below the loss of a uniform guess over 128 tokens (ln 128 = 4.85)


def test_resume_continues_from_latest_checkpoint(run_dir, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(run_dir, workdir)
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", "30", *TINY_RUN, devices=2)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 20" in r.stderr
    steps = [row["step"] for row in _rows(workdir) if "loss" in row]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert json.loads((workdir / "summary.json").read_text())["steps_this_run"] == 10


def test_eval_and_sample(run_dir):
    r = meshforge("eval", "--workdir", run_dir, "--train.eval_batches", "0", devices=2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["step"] == 20 and 0 < out["val_loss"] < 4.9
    r = meshforge("sample", "--workdir", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "12",
                  "--temperature", "0", devices=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.rstrip("\n")) == len("ROMEO:") + 12
    again = meshforge("sample", "--workdir", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "12",
                      "--temperature", "0", devices=2)
    assert again.stdout == r.stdout  # greedy decoding is deterministic


BAD = {
    "unknown key": (["--optim.lrr", "1"], "optim.lr"),
    "wrong type": (["--train.steps", "ten"], "train.steps"),
    "mesh does not divide the devices": (["--mesh.data", "3"], "mesh"),
    "batch not divisible by data parallel": (["--train.batch_size", "5"], "train.batch_size"),
    "missing data file": (["--data.path", "/no/such/corpus.txt"], "data.path"),
    "step too big for memory": (["--train.batch_size", "2048", "--train.seq_len", "2048"], "GiB of host memory"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, run_dir):
    args, key = BAD[case]
    before = tree_digest(run_dir)
    r = meshforge("train", EXPERIMENT, "--workdir", run_dir, "--train.steps", "40", *TINY_RUN, *args, devices=2)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert key in lines[0]
    assert tree_digest(run_dir) == before

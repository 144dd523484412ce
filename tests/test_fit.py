"""A model too big for memory, tried as a new user would: one line, exit 2, nothing written, no hang."""
import time

import pytest

from helpers import meshforge

EXPERIMENT = "experiments/shakespeare_char.py"
TINY = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--train.seq_len", "16",
        "--train.batch_size", "4", "--train.eval_every", "0", "--train.eval_batches", "1", "--log.progress", "none"]


@pytest.mark.parametrize("size", [["--model.d_model", "4096", "--model.n_layers", "32"],  # ~6.4e9 params
                                  ["--model.d_model", "32768", "--model.n_layers", "8"]])  # ~1e11 params
def test_a_state_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path, size):
    workdir = tmp_path / "big"
    t0 = time.monotonic()
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, *size, "--model.n_heads", "32", timeout=300)
    took = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "the train state (parameters and optimizer moments) needs" in lines[0] and "mesh.fsdp" in lines[0]
    assert not workdir.exists()  # not even the workdir was created
    assert took < 120, took  # shapes only: no allocation, no compilation of the huge step


def test_an_allocation_failure_anywhere_is_one_line_and_keeps_the_checkpoints(tmp_path):
    workdir = tmp_path / "oom"
    args = ["train", EXPERIMENT, "--workdir", workdir, "--train.steps", "20", "--train.checkpoint_every", "5", *TINY]
    r = meshforge(*args, env={"MESHFORGE_FAULTS": "oom_at_step=12"}, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("meshforge: error: out of memory (RESOURCE_EXHAUSTED") and "train.batch_size" in lines[-1]
    # The process leaves at once: a save still in flight (step 10 on a slow machine) is abandoned uncommitted,
    # and the run resumes from the newest committed checkpoint.
    committed = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert committed in ([5], [5, 10]), committed
    r = meshforge(*args)
    assert r.returncode == 0 and f"resuming at step {committed[-1]}" in r.stderr, r.stderr

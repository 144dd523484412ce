"""End to end through the `meshforge` command: train, resume, eval, sample, and bad input."""
import json
import re
import shutil
import struct

import jax
import pytest

from helpers import meshforge, tree_digest

pytestmark = pytest.mark.compat  # also run on the newest supported stack (.ci/run)

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


def _tb_scalars(path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from a TensorBoard event file (TFRecords: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, i = path.read_bytes(), {}, 0
    while i < len(data):
        n = struct.unpack("<Q", data[i:i + 8])[0]
        event = Event.FromString(data[i + 12:i + 12 + n])
        for v in event.summary.value:
            out.setdefault(v.tag, {})[event.step] = v.simple_value
        i += 12 + n + 4
    return out


def test_train_writes_the_run_files(run_dir):
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0, events
    tb = _tb_scalars(events[0])
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["vocab_size"] == 128 and cfg["name"] == "shakespeare_char"
    rows = _rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for r in train_rows:
        assert {"loss", "grad_norm", "lr", "tokens_per_s", "step_ms", "mfu"} <= set(r)
        assert 0 < r["mfu"] < 1
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert sorted(tb["loss"]) == [5, 10, 15, 20] and sorted(tb["val_loss"]) == [10, 20]
    assert tb["loss"][20] == pytest.approx(train_rows[-1]["loss"], rel=1e-6)  # TensorBoard shows metrics.jsonl's
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["tokens_this_run"] == 20 * 4 * 16
    assert summary["final_val_loss"] < 4.9  # below the loss of a uniform guess over 128 tokens (ln 128 = 4.85)
    # Time accounting: start-up (from the command's own start, imports included, to the first step) holds the
    # compilation; two evaluations; the parts fit in the whole.
    assert summary["compile_s"] < summary["startup_s"] < summary["wall_s"] and summary["evals"] == 2
    assert 0 < summary["eval_s"] < summary["wall_s"] - summary["startup_s"]
    assert 0 < summary["step_ms_median"] < 1000 * (summary["wall_s"] - summary["startup_s"]) / 20


def test_tensorboard_logging_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch when it is installed; a run's start-up must not pay for that (~2 s)."""
    import subprocess
    import sys

    from helpers import REPO

    code = ("import sys; from pathlib import Path; from train.metrics import MetricsWriter; "
            f"w = MetricsWriter(Path({str(tmp_path)!r}), enabled=True, tensorboard=True); w.write(1, {{'loss': 1.0}}); "
            "w.close(); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_compile_cache_serves_the_second_run(tmp_path):
    cache = tmp_path / "cache"
    env = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # not the tests' own
    compile_s = []
    for run in ("first", "second"):
        r = meshforge("train", EXPERIMENT, "--workdir", tmp_path / run, *TINY_RUN, "--train.steps", "2",
                      "--train.compile_cache", cache, devices=2, env=env)
        assert r.returncode == 0, r.stderr
        compile_s.append(json.loads((tmp_path / run / "summary.json").read_text())["compile_s"])
    [machine] = list(cache.iterdir())  # one subfolder for this CPU type, holding the programs
    assert any(machine.iterdir())
    assert compile_s[1] < compile_s[0] / 2, compile_s  # the train step came out of the cache
    # A cache folder that cannot be made costs the cache, not the run
    r = meshforge("train", EXPERIMENT, "--workdir", tmp_path / "nocache", *TINY_RUN, "--train.steps", "2",
                  "--train.compile_cache", "/proc/nope", devices=2, env=env)
    assert r.returncode == 0 and "warning: train.compile_cache /proc/nope: cannot create it" in r.stderr, r.stderr


def test_resume_continues_from_latest_checkpoint(run_dir, tmp_path):
    """Also checkpoint retention: the extension saves every 2 steps, keeping the last 2 and every multiple of 4."""
    workdir = tmp_path / "resumed"
    shutil.copytree(run_dir, workdir)
    r = meshforge("train", EXPERIMENT, "--workdir", workdir, "--train.steps", "30", *TINY_RUN,
                  "--train.checkpoint_every", "2", "--train.keep_checkpoints", "2", "--train.keep_every", "4",
                  devices=2)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 20" in r.stderr
    steps = [row["step"] for row in _rows(workdir) if "loss" in row]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert json.loads((workdir / "summary.json").read_text())["steps_this_run"] == 10
    # Saved: 10, 20 (earlier run), 22, 24, 26, 28, 30. Kept: the last two (28, 30) and the multiples of 4.
    left = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert left == [20, 24, 28, 30]


def _samples(stdout: str, step: int = 20) -> list[str]:
    """The texts of a `sample --num-samples N` output, each printed after a `--- sample i (step S) ---` line."""
    parts = re.split(rf"^--- sample (\d+) \(step {step}\) ---\n", stdout, flags=re.M)
    assert parts[0] == "" and parts[1::2] == [str(i + 1) for i in range(len(parts) // 2)], stdout
    return [text.removesuffix("\n") for text in parts[2::2]]


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
    # top-k 1 leaves only the most likely token: any temperature and seed then decode greedily.
    top1 = meshforge("sample", "--workdir", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "12",
                     "--temperature", "0.8", "--top-k", "1", "--num-samples", "2", "--seed", "3", devices=2)
    assert top1.returncode == 0, top1.stderr
    assert _samples(top1.stdout) == [r.stdout.removesuffix("\n")] * 2


def test_eval_at_an_earlier_step(run_dir):
    """--step picks an older checkpoint; its validation loss is the one training logged at that step (the run's
    saved config evaluates the same 2 batches)."""
    logged = {row["step"]: row["val_loss"] for row in _rows(run_dir) if "val_loss" in row}
    r = meshforge("eval", "--workdir", run_dir, "--step", "10", devices=2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["step"] == 10 and out["val_loss"] == pytest.approx(logged[10], abs=1e-5)
    assert logged[10] != pytest.approx(logged[20], abs=1e-3)  # so the step really chose the checkpoint
    r = meshforge("eval", "--workdir", run_dir, "--step", "15", devices=2)
    assert r.returncode == 2 and "--step 15" in r.stderr and "available: 10, 20" in r.stderr, r.stderr


def test_sampling_with_temperature_and_top_k(run_dir):
    args = ["sample", "--workdir", run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0.8"]
    first = meshforge(*args, "--top-k", "5", "--num-samples", "2", "--seed", "1", devices=2)
    assert first.returncode == 0, first.stderr
    samples = _samples(first.stdout)
    assert len(samples) == 2 and all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 12 for s in samples)
    assert samples[0] != samples[1]  # each sample draws its own tokens
    again = meshforge(*args, "--top-k", "5", "--num-samples", "2", "--seed", "1", devices=2)
    assert again.stdout == first.stdout  # the same seed, the same samples
    other = meshforge(*args, "--top-k", "5", "--num-samples", "2", "--seed", "2", devices=2)
    assert other.returncode == 0 and _samples(other.stdout) != samples  # the seed is used


BAD = {
    "unknown key": (["--optim.lrr", "1"], "optim.lr"),
    "wrong type": (["--train.steps", "ten"], "train.steps"),
    "mesh does not divide the devices": (["--mesh.data", "3"], "mesh"),
    "batch not divisible by data parallel": (["--train.batch_size", "5"], "train.batch_size"),
    "missing data file": (["--data.path", "/no/such/corpus.txt"], "data.path"),
    "step too big for memory": (["--train.batch_size", "2048", "--train.seq_len", "2048"], "GiB of host memory"),
}
if jax.default_backend() != "gpu":
    BAD["cudnn attention off a GPU"] = (["--model.attention_impl", "cudnn"], "model.attention_impl")


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

"""The shipped experiments reach what their docstrings say.

Fast tier: each experiment, shortened (fewer steps, a warm-up and batch to match, a small eval), must bring its
validation loss below a stated bound, far below its first loss, so a change that stops it learning fails CI.
Slow tier (`pytest -m slow`): the docstring's own command, checked against the docstring's figures.
"""
import collections
import json
import math

import pytest

from helpers import REPO, meshforge

CORPUS = REPO / "data" / "corpora" / "tinyshakespeare.txt"


def char_unigram_entropy() -> float:
    """Nats per character of the corpus's character frequencies (3.31): a model below it uses context."""
    counts = collections.Counter(CORPUS.read_text())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


BPE_UNIFORM = math.log(1024)  # 6.93: a uniform guess over shakespeare_bpe's 1,024 ids, about the first loss
QUICK_EVAL = ["--train.eval_every", "0", "--train.eval_batches", "2", "--train.checkpoint_every", "0",
              "--train.log_every", "1", "--log.progress", "none", "--log.tensorboard", "false"]
SHORT_BPE = ["--train.steps", "30", "--optim.warmup_steps", "5", "--train.batch_size", "8"]
# name: (overrides, bound on the final validation loss). Measured on a 2-core VM under load (the bound's headroom
# in brackets): char 2.905 at step 60 [0.41], moe 2.907 [0.41], sparse 2.920 [0.39], bpe 5.754 at step 30 [0.45],
# mlm 5.986 [0.31], arithmetic 1.663 at step 60 [0.64]. Each bound is also at least 0.5 below the run's first loss.
SHORT = {
    "shakespeare_char": (["--train.steps", "60"], char_unigram_entropy()),
    "shakespeare_moe": (["--train.steps", "60"], char_unigram_entropy()),
    "shakespeare_int8": (["--train.steps", "60"], char_unigram_entropy()),
    # pruned to 80% between steps 10 and 45
    "shakespeare_sparse": (["--train.steps", "60", "--prune.start_step", "10", "--prune.update_every", "5"],
                           char_unigram_entropy()),
    "shakespeare_bpe": (SHORT_BPE, BPE_UNIFORM - 0.73),
    "shakespeare_mlm": (SHORT_BPE, BPE_UNIFORM - 0.63),  # on the masked tokens only
    # the answer digits: ln 10 is a uniform guess over them
    "synthetic_arithmetic": (["--train.steps", "60", "--data.eval_problems", "16"], math.log(10)),
    # 3 rounds of 4 replicas (2.810 [0.50])
    "shakespeare_diloco": (["--train.steps", "60", "--outer.inner_steps", "20"], char_unigram_entropy()),
    # 6 rounds of 4 of 16 non-IID clients, evaluated on the first (Shakespeare) validation rows (3.507 [0.39])
    "federated_noniid": (["--train.steps", "60", "--outer.inner_steps", "10", "--optim.warmup_steps", "10"], 3.9),
    # the muP base model at its tuned lr (2.588 [0.72])
    "mup_transfer": (["--train.steps", "60"], char_unigram_entropy()),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments_cache")  # bpe and mlm share the tokenizer and packed rows


@pytest.mark.parametrize("name", SHORT)
def test_shortened_experiment_learns(name, cache, tmp_path):
    if name == "shakespeare_int8":
        pytest.importorskip("qwix")  # the edge extra
    overrides, bound = SHORT[name]
    r = meshforge("train", f"experiments/{name}.py", "--workdir", tmp_path / "run", "--data.cache_dir", cache,
                  *QUICK_EVAL, *overrides, devices=2)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # step 1
    assert summary["final_val_loss"] < bound < first - 0.5, (summary["final_val_loss"], bound, first)


# The figures each docstring states, at the steps it states them: validation loss unless named otherwise.
DOCUMENTED = {
    # "validation loss 1.7734 at step 2000" (and issue 15's acceptance: < 1.80)
    "shakespeare_char": {2000: ("val_loss", 1.7734, 0.0005)},
    # "validation loss 1.7780 at step 2000" (quantization-aware, int8 weights and inputs)
    "shakespeare_int8": {2000: ("val_loss", 1.7780, 0.0005)},
    # "gradual magnitude pruning to 80%: validation loss 1.8106"
    "shakespeare_sparse": {2000: ("val_loss", 1.8106, 0.0005)},
    # "about 1.73 at step 2000 ... below the dense shakespeare_char's 1.78" (measured 1.7260)
    "shakespeare_moe": {2000: ("val_loss", 1.73, 0.03)},
    # "4.146 / 3.817 / 3.633 / 3.571 nats per token at steps 250 / 500 / 1000 / 1500"
    "shakespeare_bpe": {250: ("val_loss", 4.146, 0.05), 500: ("val_loss", 3.817, 0.05),
                        1000: ("val_loss", 3.633, 0.05), 1500: ("val_loss", 3.571, 0.05)},
    # "4.897 / 4.214 / 3.548 / 3.348 nats at steps 250 / 500 / 1000 / 1500"
    "shakespeare_mlm": {250: ("val_loss", 4.897, 0.05), 500: ("val_loss", 4.214, 0.05),
                        1000: ("val_loss", 3.548, 0.05), 1500: ("val_loss", 3.348, 0.05)},
    # "exact_match on 256 held-out problems ... 1.00 / 1.00 at steps 1750 / 2000": at most 2% of them wrong
    "synthetic_arithmetic": {2000: ("exact_match", 0.98, "min")},
    # "this file | 1.8066" (4 DiLoCo replicas) and "FedAvg, Dirichlet 0.1 (this file): 1.4485"
    "shakespeare_diloco": {2000: ("val_loss", 1.8066, 0.0005)},
    "federated_noniid": {1000: ("val_loss", 1.4485, 0.0005)},
    # "`meshforge train experiments/mup_transfer.py` reaches validation loss 2.234 after 200 steps"
    "mup_transfer": {200: ("val_loss", 2.234, 0.0005)},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_command_reproduces_its_figures(name, tmp_path):
    """`meshforge train experiments/NAME.py`, as the docstring runs it (2-core CPU: 4 to 20 minutes each)."""
    r = meshforge("train", f"experiments/{name}.py", "--workdir", tmp_path / "run", "--data.cache_dir",
                  tmp_path / "cache", devices=2, timeout=3600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for step, (key, figure, tolerance) in DOCUMENTED[name].items():
        got = next(row[key] for row in rows if row["step"] == step and key in row)
        if tolerance == "max":
            assert got < figure, (step, key, got, figure)
        elif tolerance == "min":
            assert got >= figure, (step, key, got, figure)
        else:
            assert abs(got - figure) <= tolerance, (step, key, got, figure)


def test_finetune_starts_from_the_exported_pretraining_run(cache, tmp_path):
    """pretrain_llama (shortened; it learns like the experiments above) -> export to HF -> finetune_lora from that
    folder: the fine-tuning run starts at the pretrained model's loss, not at a random model's, and its
    validation loss goes down."""
    r = meshforge("train", "experiments/pretrain_llama.py", "--workdir", tmp_path / "pre", "--data.cache_dir", cache,
                  *QUICK_EVAL, *SHORT_BPE, devices=2)
    assert r.returncode == 0, r.stderr
    r = meshforge("export", tmp_path / "pre", "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    r = meshforge("train", "experiments/finetune_lora.py", "--workdir", tmp_path / "ft", "--data.cache_dir", cache,
                  "--train.init_from", tmp_path / "hf", *QUICK_EVAL, "--train.steps", "10", "--train.batch_size", "8",
                  "--optim.warmup_steps", "0", devices=2)
    assert r.returncode == 0, r.stderr
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    pretrained = json.loads((tmp_path / "pre" / "summary.json").read_text())["final_val_loss"]
    pre_first = json.loads((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert pretrained < math.log(512) - 0.7 < pre_first - 0.5  # uniform over 512 ids minus what 30 steps learn
    final = json.loads((tmp_path / "ft" / "summary.json").read_text())["final_val_loss"]
    assert first < pretrained + 0.5 < math.log(512)  # a random start would be near ln 512 = 6.24
    assert final < first
    # The run folder itself is a starting point too, and the same one: the HF round trip is exact.
    r = meshforge("train", "experiments/finetune_lora.py", "--workdir", tmp_path / "ft2", "--data.cache_dir", cache,
                  "--train.init_from", tmp_path / "pre", *QUICK_EVAL, "--train.steps", "1", "--train.batch_size", "8",
                  "--optim.warmup_steps", "0", devices=2)
    assert r.returncode == 0, r.stderr
    first_from_run = json.loads((tmp_path / "ft2" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first_from_run - first) < 1e-5, (first_from_run, first)


def test_curated_vs_raw_prepares_copies_apart_from_its_held_out_set(tmp_path):
    """The raw corpus holds every training speech plus the planted copies, the held-out set none of them (so
    the two runs are scored on text neither trained on), and the experiment reads what `prepare` writes."""
    import importlib

    cvr = importlib.import_module("experiments.curated_vs_raw")
    counts = cvr.prepare(tmp_path)
    raw = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    held = [json.loads(line)["text"] for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(raw) == counts["raw_documents"] == counts["train_documents"] + cvr.COPIED * cvr.COPIES
    assert sum(r["id"].startswith("copy-") for r in raw) == cvr.COPIED * cvr.COPIES
    held_set = set(held)
    assert held and not any(r["text"] in held_set for r in raw)
    originals = {r["text"] for r in raw if r["id"].startswith("doc-")}
    verbatim = [r for r in raw if r["id"].startswith("copy-") and r["text"] in originals]
    assert len(verbatim) == cvr.COPIED * cvr.COPIES // 3  # a third byte for byte; the rest edited
    cfg = cvr.get_config()
    assert cfg.data.path.endswith("raw.jsonl") and cfg.data.val_sources[0].path.endswith("heldout.jsonl")

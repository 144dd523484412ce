"""Per-source evaluation: val_loss_<name> per validation source from one pass, the data.val_max_tokens cap, and
data.val_sources (whole held-out sources instead of each training source's tail)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

pytest.importorskip("datasets")  # packed sources read through HF datasets

from data.config import DataConfig, SourceConfig, default_name  # noqa: E402
from data.packed import PackedPipeline  # noqa: E402
from data.pipeline import TextPipeline  # noqa: E402
from data.validation import ValPlan, capped_counts, spread  # noqa: E402
from data_helpers import packed, paragraphs, write_corpus  # noqa: E402
from helpers import TINY, meshforge, mesh_for  # noqa: E402
from parallel.errors import UserError  # noqa: E402
from parallel.hosts import StepFlags  # noqa: E402
from parallel.mesh import batch_sharding  # noqa: E402
from parallel.rules import activate  # noqa: E402
from train.config import Config, TrainConfig, apply_overrides  # noqa: E402
from train.loop import eval_step_for, evaluate  # noqa: E402
from train.setup import Setup, resolve_model  # noqa: E402
from train.state import init_state, model_def, state_shardings  # noqa: E402
from train.step import make_eval_step  # noqa: E402

T = 32
TASK = "synthetic:addition?digits=2"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=120)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def mixture(cache, corpus, **kw) -> DataConfig:
    return packed(cache, sources=(SourceConfig(str(corpus["txt"]), 2.0, "paragraph"), SourceConfig(TASK, 1.0)),
                  synthetic_val_rows=6, **kw)


# --- names and bad input ----------------------------------------------------------------------------------------

def test_names_come_from_the_path_and_must_be_unique():
    assert [default_name(p) for p in ("data/raw/web.jsonl", "data/shards/*.parquet", "builtin:tinyshakespeare.txt",
                                      TASK, "generator:gen.py:docs", "hf:org/wiki/en:train")] == \
        ["web", "shards", "tinyshakespeare", "addition", "docs", "wiki_en"]
    both = [{"path": "raw/corpus.jsonl"}, {"path": "clean/corpus.jsonl"}]
    cfg = Config(data=DataConfig(mode="packed"))
    with pytest.raises(UserError, match=r"data.sources\[1\].name: data.sources\[0\] \(raw/corpus.jsonl\) and "
                                         r"data.sources\[1\] \(clean/corpus.jsonl\) are both named 'corpus'"):
        apply_overrides(cfg, {"data.sources": json.dumps(both)})
    both[1]["name"] = "clean"  # naming one resolves it
    assert [s.resolved_name() for s in apply_overrides(cfg, {"data.sources": json.dumps(both)}).data.sources] == \
        ["corpus", "clean"]
    for overrides, message in [
            ({"data.val_sources": '[{"path": "a.txt", "name": "held out"}]'}, "is not a name"),
            ({"data.val_sources": '[{"path": "x/a.txt"}, {"path": "y/a.txt"}]'}, "both named 'a'"),
            ({"data.val_max_tokens": "-1"}, "data.val_max_tokens must be >= 0"),
            ({"data.mode": "windows", "data.val_sources": '[{"path": "a.txt"}]'}, "needs data.mode 'packed'")]:
        with pytest.raises(UserError, match=message):
            apply_overrides(cfg, overrides)


# --- the plan ---------------------------------------------------------------------------------------------------

def test_the_cap_shares_windows_in_proportion_spread_over_each_source():
    np.testing.assert_array_equal(capped_counts([300, 100, 3], 0), [300, 100, 3])  # no cap
    np.testing.assert_array_equal(capped_counts([300, 100, 3], 1000), [300, 100, 3])  # cap above the total
    counts = capped_counts([300, 100, 3], 40)
    np.testing.assert_array_equal(counts, [29, 9, 1])  # floor(40 n / 403), at least one each
    assert counts.sum() <= 40
    np.testing.assert_array_equal(spread(10, 4), [0, 2, 5, 7])
    plan = ValPlan([300, 100, 3], 40)
    source, index, position = plan.locate(np.arange(plan.total))
    assert plan.total == 39 and np.bincount(source).tolist() == [29, 9, 1]
    assert index[source == 0].max() > 280 and index[source == 1].max() > 80  # the whole split, not its start
    np.testing.assert_array_equal(position, np.array([0, 300, 400])[source] + index)  # uncapped places


# --- the pipeline -----------------------------------------------------------------------------------------------

def live_windows(batches) -> list[tuple[np.ndarray, int]]:
    """(inputs, source) of every row with weight, in order."""
    out = []
    for b in batches:
        for r in np.flatnonzero(b["weights"].sum(1) > 0):
            out.append((b["inputs"][r], int(b.get("source", np.zeros(len(b["inputs"]), int))[r])))
    return out


def test_capped_windows_are_uncapped_ones_of_every_source(corpus, cache):
    full = PackedPipeline(mixture(cache, corpus, objective="causal"), batch_size=8, seq_len=T, seed=0)
    assert full.val_names == ["corpus", "addition"]
    every = live_windows(full.eval_batches(8, np.arange(8)))
    assert [s for _, s in every] == [0] * full.sources[0].n_val + [1] * 6  # each source's windows, in order
    cap = 10 * T
    capped = PackedPipeline(mixture(cache, corpus, val_max_tokens=cap), batch_size=8, seq_len=T, seed=0)
    batches = list(capped.eval_batches(8, np.arange(8)))
    got = live_windows(batches)
    assert len(got) * T <= cap and {s for _, s in got} == {0, 1}  # the cap holds, and both sources are read
    assert sum(float(b["weights"].sum()) for b in batches) <= cap
    index = capped.val_plan.index[0]
    want = [w for w, s in every if s == 0]
    for (w, s), i in zip([x for x in got if x[1] == 0], index):
        np.testing.assert_array_equal(w, want[i])  # the same window as uncapped
    assert index[-1] > full.sources[0].n_val // 2  # spread over the split
    again = live_windows(capped.eval_batches(8, np.arange(8)))
    assert all(np.array_equal(a, b) and s == t for (a, s), (b, t) in zip(got, again))  # every evaluation


def test_masked_windows_do_not_change_under_the_cap(corpus, cache):
    """The objective keys its random choices by the window's uncapped place, so a capped window reads the same."""
    cfg = packed(cache, path=str(corpus["txt"]), split_by="paragraph", objective="masked")
    full = list(PackedPipeline(cfg, batch_size=8, seq_len=T, seed=0).eval_batches(8, np.arange(8)))
    capped = PackedPipeline(dataclasses.replace(cfg, val_max_tokens=5 * T), batch_size=8, seq_len=T, seed=0)
    rows = np.concatenate([b["inputs"] for b in full])
    got = next(iter(capped.eval_batches(8, np.arange(8))))
    np.testing.assert_array_equal(got["inputs"][:5], rows[capped.val_plan.index[0]])
    assert "source" not in got  # one validation source: no index to carry


def test_windows_mode_cap_reads_evenly_spread_windows(corpus):
    cfg = DataConfig(path=str(corpus["txt"]))
    full = TextPipeline(cfg, batch_size=4, seq_len=T, seed=0)
    capped = TextPipeline(dataclasses.replace(cfg, val_max_tokens=4 * T), batch_size=4, seq_len=T, seed=0)
    every = np.concatenate([b["inputs"] for b in full.eval_batches(4, np.arange(4))])
    got = list(capped.eval_batches(4, np.arange(4)))
    assert len(got) == 1 and got[0]["weights"].sum() == 4 * T
    np.testing.assert_array_equal(got[0]["inputs"], every[spread(len(every), 4)])


def test_val_sources_are_read_whole_instead_of_the_tails(corpus, cache):
    held = SourceConfig(str(corpus["jsonl"]), text_field="body", name="held")
    cfg = mixture(cache, corpus, val_sources=(held, SourceConfig("synthetic:addition?digits=3")))
    pipe = PackedPipeline(cfg, batch_size=8, seq_len=T, seed=0)
    assert pipe.val_names == ["held", "addition"] and [s.n_val for s in pipe.sources] != \
        [s.n_val for s in pipe.val_sources]
    batches = list(pipe.eval_batches(8, np.arange(8)))
    text_rows = [b["inputs"][b["source"] == 0] for b in batches]
    weights = sum(float(b["weights"][b["source"] == 0].sum()) for b in batches)
    # every document of the source is predicted: each token after the first of a document, and its <eos>
    docs = paragraphs(120)
    assert weights == sum(len(d) for d in docs)
    seen = "".join(pipe.tokenizer.decode(r) for rows in text_rows for r in rows)
    assert docs[0][:20] in seen and docs[-1][-20:] in seen  # its first and its last document
    problems = [pipe.tokenizer.decode(r) for b in batches for r in b["inputs"][b["source"] == 1]]
    assert any(len(p.split("+")[0]) == 3 for p in problems)  # the 3-digit task's held-out rows


# --- the loss ---------------------------------------------------------------------------------------------------

def test_row_sums_chunked_or_not_match_numpy():
    from models.loss import cross_entropy_sums

    rng = np.random.default_rng(0)
    x_BTD, head_DV = rng.normal(size=(4, 10, 8)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32)
    targets_BT = rng.integers(0, 16, (4, 10)).astype(np.int32)
    weights_BT = (rng.random((4, 10)) < 0.7).astype(np.float32)
    logits = x_BTD @ head_DV
    lse = np.log(np.exp(logits).sum(-1))
    want_B = ((lse - np.take_along_axis(logits, targets_BT[..., None], -1)[..., 0]) * weights_BT).sum(1)
    with activate(mesh_for(data=1)):
        for chunk in (40, 8):  # one chunk (the plain form), and the scan over 3 chunks of 3 positions
            plain = cross_entropy_sums(x_BTD, head_DV, targets_BT, weights_BT, chunk_tokens=chunk)
            total, weight, rows_B = cross_entropy_sums(x_BTD, head_DV, targets_BT, weights_BT, chunk_tokens=chunk,
                                                       per_row=True)
            np.testing.assert_allclose(rows_B, want_B, rtol=1e-5)
            assert float(total) == float(plain[0]) and float(weight) == float(plain[1])  # the total as without


def _setup(data_cfg: DataConfig, mesh) -> Setup:
    cfg = Config(model=dataclasses.replace(TINY, vocab_size=0, max_seq_len=T), data=data_cfg,
                 train=TrainConfig(batch_size=4, seq_len=T, eval_batch_size=8))
    data = PackedPipeline(cfg.data, batch_size=4, seq_len=T, seed=0)
    cfg = resolve_model(cfg, data.tokenizer.vocab_size)
    mdef = model_def(cfg.model)
    from optim.chains import build_optimizer

    tx, schedule = build_optimizer(cfg.optim, 10)
    return Setup(cfg, mesh, data, mdef, tx, schedule, state_shardings(tx, mdef, mesh), batch_sharding(mesh),
                 StepFlags(mesh))


def test_per_source_losses_are_each_source_evaluated_alone(corpus, cache):
    """On 2 devices (rows and their source index sharded): val_loss_<name> equals the val_loss of a run whose
    only source is that one, the token-weighted mean of them is val_loss, and val_loss is the plain step's."""
    mesh = mesh_for(data=2)
    base = mixture(cache, corpus, tokenizer="byte")  # one tokenizer whatever the sources: the same model
    setup = _setup(base, mesh)
    with activate(mesh):
        params = init_state(setup.tx, setup.mdef, setup.shardings, 0)["params"]
        losses = evaluate(setup, params, eval_step_for(setup))
        assert set(losses) == {"val_loss", "val_loss_corpus", "val_loss_addition"}
        for name, src in zip(("corpus", "addition"), base.sources):
            alone = _setup(dataclasses.replace(base, sources=(src,)), mesh)
            assert alone.data.val_names == [name]
            got = evaluate(alone, params, eval_step_for(alone))
            assert set(got) == {"val_loss"}  # one source: val_loss is its loss, no second key
            np.testing.assert_allclose(losses[f"val_loss_{name}"], got["val_loss"], rtol=1e-5)
        weights = np.zeros(2)
        plain_step = make_eval_step(setup.mdef, setup.shardings["params"], setup.batch_sharding)
        plain = []
        from data.loader import process_rows, to_global

        rows = process_rows(setup.batch_sharding, 8)
        for b in setup.data.eval_batches(8, rows):
            np.add.at(weights, b.pop("source"), b["weights"].sum(1))
            plain.append(jax.device_get(plain_step(params, to_global(b, setup.batch_sharding, 8))))
    mean = (weights[0] * losses["val_loss_corpus"] + weights[1] * losses["val_loss_addition"]) / weights.sum()
    np.testing.assert_allclose(mean, losses["val_loss"], rtol=1e-6)
    loss, weight = (float(sum(x)) for x in zip(*plain))
    assert losses["val_loss"] == loss / weight  # exactly today's val_loss


# --- through the command ----------------------------------------------------------------------------------------

def test_a_run_logs_val_loss_per_validation_source(corpus, tmp_path):
    """Trains on the .txt corpus, validates on the same documents as JSONL plus a task, capped: every eval row has
    val_loss_<name> per validation source; the summary and `meshforge eval` report them too."""
    val = json.dumps([{"path": str(corpus["jsonl"]), "text_field": "body", "name": "clean"}, {"path": TASK}])
    workdir = tmp_path / "run"
    r = meshforge("train", "experiments/shakespeare_char.py", "--workdir", workdir, "--data.mode", "packed",
                  "--data.path", corpus["txt"], "--data.split_by", "paragraph", "--data.cache_dir", tmp_path / "c",
                  "--data.val_sources", val, "--data.val_max_tokens", 20 * T, "--data.prefetch", "0",
                  "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.max_seq_len",
                  T, "--train.seq_len", T, "--train.batch_size", "4", "--train.steps", "6", "--train.eval_every",
                  "3", "--train.log_every", "3", "--train.checkpoint_every", "0", "--log.progress", "lines",
                  "--log.tensorboard", "false", devices=2)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if "val_loss" in x]
    assert [x["step"] for x in evals] == [3, 6]
    for x in evals:
        assert x["val_loss"] > 0 and x["val_loss_clean"] > 0 and x["val_loss_addition"] > 0
        lo, hi = sorted([x["val_loss_clean"], x["val_loss_addition"]])
        assert lo <= x["val_loss"] <= hi  # a weighted mean of the two
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_val_loss_clean"] == evals[-1]["val_loss_clean"]
    assert "val_loss_clean" not in r.stderr  # the progress lines stay short
    out = meshforge("eval", "--workdir", workdir, devices=2)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["val_loss_clean"] == pytest.approx(evals[-1]["val_loss_clean"], abs=2e-6)

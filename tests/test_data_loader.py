"""The packed loader: indexable per-epoch permutations, weighted mixtures, O(1) resume, host slices, prefetch."""
import json
import time

import numpy as np
import pytest

from data.loader import MixtureSchedule, permute
from data.packed import PackedPipeline
from data_helpers import batches_equal, mixture, packed, replace, write_corpus

B, T = 8, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=200)["txt"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection_fresh_each_epoch(n):
    perms = [permute(np.arange(n), n, 7, 0, epoch) for epoch in range(3)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(n))
    if n > 4:
        assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[0], np.arange(n))
    some = np.array([n - 1, 0, n // 2])
    np.testing.assert_array_equal(permute(some, n, 7, 0, 1), perms[1][some])  # any index, no materialising


def test_permutation_at_a_huge_index_is_instant():
    n = 10**12
    t0 = time.perf_counter()
    out = permute(np.arange(n - 64, n), n, 1, 2, 3)
    assert time.perf_counter() - t0 < 0.1 and len(set(out.tolist())) == 64 and (out < n).all()


def test_mixture_keeps_weights_and_counts_each_source_in_order():
    sched = MixtureSchedule([3.0, 1.0, 0.5], seed=1)
    source, index = sched.locate(np.arange(3 * sched.block))
    assert np.allclose(np.bincount(source) / len(source), np.array([3, 1, 0.5]) / 4.5, atol=1e-3)
    for k in range(3):
        np.testing.assert_array_equal(index[source == k], np.arange((source == k).sum()))  # each sample once
    far = np.arange(10**9, 10**9 + 50)
    s2, i2 = sched.locate(far)
    assert (i2 >= 0).all() and set(s2.tolist()) <= {0, 1, 2}


def test_an_epoch_reads_every_row_once(corpus, cache):
    pipe = PackedPipeline(packed(cache, path=str(corpus), split_by="paragraph"), batch_size=B, seq_len=T, seed=3)
    src = pipe.sources[0]
    n = src.n_train
    q = src.train_windows(np.arange(n))
    whole = src._windows(src.train, np.arange(n))
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(q.tokens) == key(whole.tokens)  # a permutation of all windows
    nxt = src.train_windows(np.arange(n, 2 * n))
    assert key(nxt.tokens) == key(whole.tokens) and not np.array_equal(nxt.tokens, q.tokens)


def _configs(cache, corpus):
    base = packed(cache, path=str(corpus), split_by="paragraph")
    return {
        "causal": base,
        "masked": replace(base, objective="masked"),
        "span": replace(base, objective="span"),
        "mixture": mixture(cache, corpus),
    }


@pytest.mark.parametrize("kind", ["causal", "masked", "span", "mixture"])
def test_resume_gives_the_same_batches(kind, corpus, cache):
    """Batches k..k+20 of a fresh loader equal those of a new loader restored from the state saved at step k."""
    cfg = _configs(cache, corpus)[kind]
    k, rows = 13, np.arange(B)
    first = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=5)
    expected = [first.train_batch(s, rows) for s in range(k + 21)]
    saved = json.loads(json.dumps(first.state(k)))  # as it goes through the checkpoint
    assert saved["position"] == k * B

    second = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=5)
    second.restore(saved)
    for s in range(k, k + 21):
        assert batches_equal(second.train_batch(s, rows), expected[s]), (kind, s)
    other_seed = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=6)
    assert not batches_equal(other_seed.train_batch(k, rows), expected[k])  # the test can fail


def test_resume_with_another_batch_size_continues_the_sample_stream(corpus, cache):
    cfg = mixture(cache, corpus)
    a = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=0)
    stream = np.concatenate([a.train_batch(s, np.arange(B))["inputs"] for s in range(12)])
    b = PackedPipeline(cfg, batch_size=B // 2, seq_len=T, seed=0)
    b.restore(a.state(4))  # 4 steps of 8 = 32 samples drawn
    got = np.concatenate([b.train_batch(s, np.arange(B // 2))["inputs"] for s in range(4, 20)])
    np.testing.assert_array_equal(got, stream[32:96])


def test_restore_far_ahead_is_o1(corpus, cache):
    cfg = mixture(cache, corpus)
    pipe = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=0)
    pipe.restore({"step": 10**9, "position": 10**9 * B, "fingerprint": pipe.fingerprint})
    t0 = time.perf_counter()
    batch = pipe.train_batch(10**9, np.arange(B))
    assert time.perf_counter() - t0 < 1.0 and batch["inputs"].shape == (B, T)


def test_host_slices_and_prefetch_agree_with_the_whole_batch(corpus, cache):
    cfg = replace(mixture(cache, corpus, objective="causal"), prefetch=3)
    pipe = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=2)
    sync = PackedPipeline(replace(cfg, prefetch=0), batch_size=B, seq_len=T, seed=2)
    halves = (np.arange(B // 2), np.arange(B // 2, B))
    for s in [0, 1, 2, 7, 3, 4]:  # in order, a jump ahead, and back
        whole = sync.train_batch(s, np.arange(B))
        assert batches_equal(pipe.train_batch(s, np.arange(B)), whole)
        for h in halves:
            part = pipe.train_batch(s, h)
            assert batches_equal(part, {k: v[h] for k, v in whole.items()})
    pipe.close()


def test_eval_batches_cover_each_validation_window_once(corpus, cache):
    cfg = mixture(cache, corpus, synthetic_val_rows=5)
    pipe = PackedPipeline(cfg, batch_size=B, seq_len=T, seed=0)
    total = sum(s.n_val for s in pipe.sources)
    got = list(pipe.eval_batches(B, np.arange(B)))
    assert len(got) == -(-total // B)
    live_rows = sum(int((b["weights"].sum(1) > 0).sum()) for b in got)
    assert live_rows == total and got[-1]["weights"][total % B or B:].sum() == 0  # each window once, padding 0
    windows = np.concatenate([s.val_windows(np.arange(s.n_val)).tokens[:, :T] for s in pipe.sources])
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in got])[:total], windows)  # in source order
    again = list(pipe.eval_batches(B, np.arange(B)))
    assert len(again) == len(got) and all(batches_equal(x, y) for x, y in zip(got, again))  # the same every time
    assert len(list(pipe.eval_batches(B, np.arange(B), max_batches=2))) == 2


def test_windows_mode_resume_with_another_batch_size_continues_the_sample_stream(corpus):
    """The README's claim for every mode: a resume at another batch size reads on from the samples already drawn."""
    import json

    from data.config import DataConfig
    from data.pipeline import TextPipeline

    cfg = DataConfig(path=str(corpus))  # data.mode windows
    a = TextPipeline(cfg, batch_size=B, seq_len=T, seed=0)
    stream = np.concatenate([a.train_batch(s, np.arange(B))["inputs"] for s in range(12)])
    assert len({bytes(r) for r in stream}) == len(stream)  # distinct windows: a shifted stream cannot match
    for batch, resume_at in [(B // 2, 4), (B, 4), (2 * B, 2)]:
        b = TextPipeline(cfg, batch_size=batch, seq_len=T, seed=0, tokenizer=a.tokenizer)
        b.restore(json.loads(json.dumps(a.state(resume_at))))  # as it goes through the checkpoint
        drawn = resume_at * B
        steps = range(resume_at, resume_at + (len(stream) - drawn) // batch)
        got = np.concatenate([b.train_batch(s, np.arange(batch))["inputs"] for s in steps])
        np.testing.assert_array_equal(got, stream[drawn:], err_msg=f"batch {batch}")

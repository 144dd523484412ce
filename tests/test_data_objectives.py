"""Objectives: causal, BERT-style masked LM (15% / 80-10-10), T5-style span corruption for a decoder."""
import numpy as np
import pytest

from data.objectives import Objective, Windows, corrupt_spans, uncorrupt_spans
from data.packing import pack_documents
from data.tokenize import N_SENTINELS, SPECIALS, ByteTokenizer
from data_helpers import paragraphs

TOK = ByteTokenizer(SPECIALS)
EOS, PAD = TOK.special_id("<eos>"), TOK.special_id("<pad>")


def _windows(seq_len=128):
    docs = [np.append(TOK.encode(p), EOS).astype(np.int32) for p in paragraphs(400)]
    tokens, segs = pack_documents(docs, seq_len, PAD)
    return Windows(tokens, segs, np.ones(tokens.shape, bool))


def test_masked_lm_rates_and_targets():
    win = _windows()
    obj = Objective("masked", TOK, 128, seed=1)
    b = obj(win, np.arange(len(win.tokens)))
    tokens = win.tokens[:, :128]
    chosen = b["weights"] > 0
    regular = (win.segment_ids[:, :128] > 0) & (tokens < 256)
    assert not chosen[~regular].any()  # never padding, <eos> or other specials
    assert abs(chosen.sum() / regular.sum() - 0.15) < 0.01
    np.testing.assert_array_equal(b["targets"], tokens)
    np.testing.assert_array_equal(b["inputs"][~chosen], tokens[~chosen])  # only chosen tokens change
    masked = (b["inputs"] == TOK.special_id("<mask>")) & chosen
    changed = (b["inputs"] != tokens) & ~masked & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    # 10% random tokens (a random token equals the original ~1/256 of the time) and 10% unchanged
    assert abs(changed.sum() / chosen.sum() - 0.1) < 0.02
    assert (b["inputs"][changed] < 256).all()
    assert (b["positions"][b["segment_ids"] > 0] < 128).all()


def test_objective_randomness_is_keyed_by_position_not_call():
    win = _windows()
    obj = Objective("masked", TOK, 128, seed=1)
    p = np.arange(len(win.tokens))
    a, b = obj(win, p), obj(win, p)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    rows = np.array([5, 2, 9])
    part = obj(Windows(win.tokens[rows], win.segment_ids[rows], win.loss_mask[rows]), p[rows])
    np.testing.assert_array_equal(part["inputs"], a["inputs"][rows])  # a host's rows equal the global rows
    assert not np.array_equal(obj(win, p + 1)["weights"], a["weights"])
    assert not np.array_equal(obj(win, p, "val")["weights"], a["weights"])


@pytest.mark.parametrize("n", [2, 3, 10, 57, 200])
def test_span_corruption_is_invertible(n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 256, size=n).astype(np.int32)
    sentinels = np.array([TOK.special_id(f"<extra_id_{i}>") for i in range(N_SENTINELS)])
    n_spans = max(1, min(N_SENTINELS, round(n * 0.15 / 3), n // 2))
    prefix, answer = corrupt_spans(tokens, 0.15, n_spans, sentinels, rng)
    np.testing.assert_array_equal(uncorrupt_spans(prefix, answer, sentinels), tokens)
    assert np.isin(prefix, sentinels).sum() == np.isin(answer, sentinels).sum() == n_spans
    assert len(prefix) + len(answer) == n + 2 * n_spans


def test_span_batches_fit_and_train_only_the_answer():
    win = _windows(64)
    obj = Objective("span", TOK, 64, seed=0)
    b = obj(win, np.arange(len(win.tokens)))
    sentinels = obj.sentinels
    noise = []
    for r in range(len(win.tokens)):
        n = int((b["segment_ids"][r] > 0).sum())
        seq = np.concatenate([b["inputs"][r, :n], b["targets"][r, n - 1:n]])
        assert seq[-1] == EOS and n <= 64
        first = int(np.flatnonzero(b["weights"][r])[0])
        prefix, answer = seq[: first + 1], seq[first + 1:-1]
        assert answer[0] == sentinels[0] and (b["weights"][r, first:n] == 1).all() and b["weights"][r, :first].sum() == 0
        raw = win.tokens[r, : obj.n_raw][win.segment_ids[r, : obj.n_raw] > 0]
        np.testing.assert_array_equal(uncorrupt_spans(prefix, answer, sentinels), raw)
        noise.append((len(answer) - np.isin(answer, sentinels).sum()) / len(raw))
    assert abs(np.mean(noise) - 0.15) < 0.02

"""Packing: rows, segment ids and positions, padding-free weights, and no attention across documents."""
import dataclasses

import jax
import numpy as np
import pytest

from data.objectives import Objective, Windows
from data.packing import pack_documents, positions_from_segments
from data.tokenize import SPECIALS, ByteTokenizer
from helpers import TINY
from train.state import model_def

TOK = ByteTokenizer(SPECIALS)
PAD, EOS = TOK.special_id("<pad>"), TOK.special_id("<eos>")


def _docs(*texts):
    return [np.append(TOK.encode(t), EOS).astype(np.int32) for t in texts]


def test_rows_overlap_by_one_token_and_cover_the_stream():
    docs = _docs("hello world", "ab", "a longer third document")
    tokens, segs = pack_documents(docs, pack_len=8, pad_id=PAD)
    stream = np.concatenate(docs)
    assert tokens.shape == segs.shape == (-(-(len(stream) - 1) // 8), 9)
    np.testing.assert_array_equal(tokens[:-1, 8], tokens[1:, 0])  # row r ends where row r + 1 starts
    rebuilt = np.concatenate([tokens[0]] + [t[1:] for t in tokens[1:]])
    np.testing.assert_array_equal(rebuilt[: len(stream)], stream)
    assert (rebuilt[len(stream):] == PAD).all() and (segs.reshape(-1)[segs.reshape(-1) == 0].size > 0)
    seg_stream = np.concatenate([segs[0]] + [s[1:] for s in segs[1:]])[: len(stream)]
    np.testing.assert_array_equal(seg_stream, np.repeat([1, 2, 3], [len(d) for d in docs]))


def test_positions_restart_at_documents_and_rows():
    segs = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 4, 4, 4, 4, 5]])
    np.testing.assert_array_equal(positions_from_segments(segs), [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 0]])


def test_causal_weights_train_each_token_once_never_across_documents_or_on_padding():
    docs = _docs("first doc", "2nd", "and the third one, longer than a row")
    tokens, segs = pack_documents(docs, pack_len=8, pad_id=PAD)
    batch = Objective("causal", TOK, 8, seed=0)(Windows(tokens, segs, np.ones(tokens.shape, bool)), np.arange(len(tokens)))
    w = batch["weights"] > 0
    assert not (batch["targets"][w] == PAD).any()
    assert (batch["segment_ids"][w] > 0).all()
    # every token after the first of its document is a target exactly once
    assert w.sum() == sum(len(d) - 1 for d in docs)
    trained = sorted(batch["targets"][w].tolist())
    assert trained == sorted(np.concatenate([d[1:] for d in docs]).tolist())


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("causal", [True, False])
def test_a_document_is_unchanged_by_its_packed_neighbour(positions, causal):
    """The model output for document A is the same alone and packed after document B (within float32 noise)."""
    cfg = dataclasses.replace(TINY, vocab_size=320, positions=positions, causal=causal)
    mdef = model_def(cfg)
    params = mdef.init_params(seed=3)
    obj = Objective("causal", TOK, 16, seed=0)

    def batch(docs):
        tokens, segs = pack_documents(docs, pack_len=16, pad_id=PAD)
        return obj(Windows(tokens[:1], segs[:1], np.ones((1, 17), bool)), np.zeros(1))

    a, b = _docs("abc de"), _docs("xyzw!")
    alone, packed = batch(a), batch(b + a)
    apply = jax.jit(lambda p, x, s, q: mdef.apply(p, x, segment_ids_BT=s, positions_BT=q))
    logits = {name: np.asarray(apply(params, bt["inputs"], bt["segment_ids"], bt["positions"]))
              for name, bt in (("alone", alone), ("packed", packed))}
    n, off = len(a[0]), len(b[0])
    np.testing.assert_array_equal(packed["positions"][0, off:off + n], np.arange(n))
    np.testing.assert_allclose(logits["packed"][0, off:off + n], logits["alone"][0, :n], atol=1e-5, rtol=1e-5)
    # with one segment over the whole row the neighbour does leak in (the test can fail)
    one_doc = np.ones_like(packed["segment_ids"])
    leak = np.asarray(apply(params, packed["inputs"], one_doc, packed["positions"]))[0, off:off + n]
    assert np.abs(leak - logits["alone"][0, :n]).max() > 1e-3

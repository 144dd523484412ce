"""Tokenizers, the shipped corpus, deterministic windows, whole-split evaluation batches, per-host rows."""
import numpy as np
import pytest

from data.loader import WindowLoader, eval_batches, process_rows
from data.sources import read_text, text_splits
from data.tokenize import ByteTokenizer, CharTokenizer, load_tokenizer, save_tokenizer
from helpers import mesh_for
from parallel.errors import UserError
from parallel.mesh import batch_sharding


def test_builtin_corpus_and_char_vocab():
    text = read_text("builtin:tinyshakespeare.txt")
    assert len(text) == 1_115_394
    tok = CharTokenizer.fit(text)
    assert tok.vocab_size == 65
    train, val = text_splits("builtin:tinyshakespeare.txt", 0.1, tok)
    assert len(val) == int(len(text) * 0.1) and len(train) + len(val) == len(text)
    assert tok.decode(val[:20]) == text[len(train):len(train) + 20]


@pytest.mark.parametrize("tok", [CharTokenizer("abc é\n"), ByteTokenizer()])
def test_tokenizer_round_trip(tok, tmp_path):
    text = "abc é\nba"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    save_tokenizer(tok, tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert list(again.encode(text)) == list(ids)


def test_char_tokenizer_rejects_unknown_characters():
    with pytest.raises(UserError, match="outside"):
        CharTokenizer("abc").encode("abz")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="data.path"):
        read_text(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_text(str(tmp_path / "empty.txt"))


def test_windows_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.int32)
    rows = np.arange(4)
    a, b = WindowLoader(tokens, 4, 8, seed=1), WindowLoader(tokens, 4, 8, seed=1)
    for step in (0, 7, 123):
        np.testing.assert_array_equal(a.host_batch(step, rows)["inputs"], b.host_batch(step, rows)["inputs"])
    assert not np.array_equal(a.host_batch(0, rows)["inputs"], a.host_batch(1, rows)["inputs"])
    batch = a.host_batch(3, rows)
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # next-token targets
    np.testing.assert_array_equal(a.host_batch(3, np.array([1, 3]))["inputs"], batch["inputs"][[1, 3]])


def test_eval_batches_cover_every_target_once():
    tokens = np.arange(1, 103, dtype=np.int32)  # 101 targets: not a multiple of seq_len or batch
    seen = []
    for b in eval_batches(tokens, batch_size=4, seq_len=8, rows=np.arange(4)):
        seen.extend(b["targets"][b["weights"] > 0].tolist())
        assert np.array_equal(b["targets"][b["weights"] > 0], b["inputs"][b["weights"] > 0] + 1)
    assert sorted(seen) == list(range(2, 103))


def test_process_rows_single_process_holds_all():
    sharding = batch_sharding(mesh_for(data=2, fsdp=2, tensor=2))
    assert process_rows(sharding, 8).tolist() == list(range(8))

"""Sources (text/JSONL/Parquet files and folders, generators), tokenizers (byte, char, BPE), the on-disk cache."""
import os
import time

import numpy as np
import pytest

from data.cache import get_tokenizer, packed_rows
from data.config import DataConfig, SourceConfig
from data.packed import PackedPipeline
from data.sources import load_documents
from data.tokenize import SPECIALS, BPETokenizer, ByteTokenizer, CharTokenizer, fingerprint, load_tokenizer, \
    save_tokenizer
from data_helpers import packed, paragraphs, replace, write_corpus
from parallel.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _texts(key, src, cache):
    return sorted(t.strip() for t in load_documents(key, src, cache)["text"])


def test_every_format_reads_the_same_documents(corpus, tmp_path):
    expected = sorted(p.strip() for p in paragraphs(300))
    assert _texts("data", SourceConfig(str(corpus["txt"]), split_by="paragraph"), tmp_path) == expected
    assert _texts("data", SourceConfig(str(corpus["jsonl"]), text_field="body"), tmp_path) == expected
    assert _texts("data", SourceConfig(str(corpus["parquet"])), tmp_path) == expected
    assert _texts("data", SourceConfig(str(corpus["folder"]), split_by="paragraph"), tmp_path) == expected
    assert _texts("data", SourceConfig(str(corpus["folder"] / "*.txt"), split_by="paragraph"), tmp_path) == expected
    whole = _texts("data", SourceConfig(str(corpus["txt"]), split_by="document"), tmp_path)
    assert len(whole) == 1 and len(_texts("data", SourceConfig(str(corpus["txt"]), split_by="line"), tmp_path)) > 300


@pytest.mark.parametrize("spec", ["generator:data_helpers:docs_generator",
                                  "generator:tests/data_helpers.py:docs_generator"])
def test_generator_source(spec, tmp_path):
    assert _texts("data", SourceConfig(spec), tmp_path) == sorted(p.strip() for p in paragraphs(120))


def test_bad_sources_are_user_errors(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "notes.md").write_text("hi")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("a")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"text": "b"}\n')
    cases = {
        str(tmp_path / "missing.txt"): "not found",
        str(tmp_path / "empty.txt"): "no text",
        str(tmp_path / "blank"): "has no",
        str(tmp_path / "mixed"): "mixes",
        str(tmp_path / "nomatch*.txt"): "has no",
        "generator:no_such_module_here:gen": "cannot import",
        "generator:data_helpers:nope": "no function",
    }
    for path, msg in cases.items():
        with pytest.raises(UserError, match=msg) as e:
            load_documents("data.sources[1]", SourceConfig(path), tmp_path / "hf")
        assert str(e.value).startswith("data.sources[1].path:")
    with pytest.raises(UserError, match="data.text_field"):
        load_documents("data", SourceConfig(str(corpus["jsonl"]), text_field="nope"), tmp_path / "hf")


def test_mixture_weights_must_be_positive():
    for w in (0, -1.5):
        with pytest.raises(ValueError, match=r"data.sources\[1\].weight must be > 0"):
            DataConfig(mode="packed", sources=(SourceConfig("a.txt"), SourceConfig("b.txt", weight=w)))


def test_bpe_trains_round_trips_and_reloads(tmp_path):
    docs = paragraphs(400)
    tok = BPETokenizer.train([docs], vocab_size=400)
    assert tok.vocab_size == 400
    assert [tok.special_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))  # specials are whole tokens
    text = "ROMEO: Wherefore art thou? — ünïcödé ☃\n\nend"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: any text survives
    assert len(tok.encode(docs[0])) < len(docs[0]) / 1.5  # merges compress the training text
    save_tokenizer(tok, tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert fingerprint(again) == fingerprint(tok) and list(again.encode(text)) == list(ids)
    (tmp_path / "hf.json").write_text(tok.tok.to_str())  # a plain HuggingFace tokenizers file loads too
    assert list(load_tokenizer(tmp_path / "hf.json").encode(text)) == list(ids)
    assert fingerprint(BPETokenizer.train([docs], vocab_size=400)) == fingerprint(tok)  # deterministic training


@pytest.mark.parametrize("tok", [CharTokenizer("abc\n", SPECIALS), ByteTokenizer(SPECIALS)])
def test_specials_follow_the_regular_ids(tok, tmp_path):
    eos, mask = tok.special_id("<eos>"), tok.special_id("<mask>")
    assert eos >= tok.vocab_size - len(SPECIALS) and tok.vocab_size == len(tok.regular_ids()) + len(SPECIALS)
    ids = np.concatenate([tok.encode("ab\nc"), [mask, eos]])
    assert tok.decode(ids) == "ab\nc<mask><eos>"
    save_tokenizer(tok, tmp_path / "t.json")
    assert fingerprint(load_tokenizer(tmp_path / "t.json")) == fingerprint(tok)


def test_tokenizer_is_cached_and_keyed_by_its_settings(corpus, tmp_path):
    cfg = packed(tmp_path, path=str(corpus["txt"]), split_by="paragraph", tokenizer="bpe", bpe_vocab_size=400)
    tok, path = get_tokenizer(cfg)
    assert path.is_file() and path.parent == tmp_path / "tokenizers"
    mtime = path.stat().st_mtime_ns
    again, path2 = get_tokenizer(cfg)
    assert path2 == path and path.stat().st_mtime_ns == mtime and fingerprint(again) == fingerprint(tok)
    bigger, path3 = get_tokenizer(replace(cfg, bpe_vocab_size=500))
    assert path3 != path and bigger.vocab_size == 500


def test_packed_rows_are_cached_and_a_changed_tokenizer_is_not_reused(corpus, tmp_path, capfd):
    src = SourceConfig(str(corpus["txt"]), split_by="paragraph")
    char = CharTokenizer.fit(corpus["txt"].read_text(), SPECIALS)
    train, val, meta = packed_rows("data", src, char, 32, 0.1, tmp_path)
    assert "cached" in capfd.readouterr().err
    assert meta["train_documents"] + meta["val_documents"] == 300 and val.n_rows > 0
    t0 = time.perf_counter()
    train2, _, meta2 = packed_rows("data", src, char, 32, 0.1, tmp_path)
    assert time.perf_counter() - t0 < 2.0 and capfd.readouterr().err == ""  # a hit: memory-mapped, no rebuild
    assert meta2 == meta and train2.n_rows == train.n_rows
    rows = np.arange(train.n_rows)
    np.testing.assert_array_equal(train.gather(rows, rows * 0, 33)[0], train2.gather(rows, rows * 0, 33)[0])

    other = ByteTokenizer(SPECIALS)  # another tokenizer: new rows, and the rebuild says why
    train3, _, meta3 = packed_rows("data", src, other, 32, 0.1, tmp_path)
    err = capfd.readouterr().err
    assert "tokenizer" in err and fingerprint(char) in err and meta3["tokenizer"] == fingerprint(other)
    assert other.decode(train3.gather(rows[:1], rows[:1] * 0, 33)[0][0]) == \
        char.decode(train.gather(rows[:1], rows[:1] * 0, 33)[0][0])  # the same text, in the new tokenizer's ids
    assert not np.array_equal(train3.gather(rows[:1], rows[:1] * 0, 33)[0], train.gather(rows[:1], rows[:1] * 0, 33)[0])

    os.utime(corpus["txt"], ns=(time.time_ns(), time.time_ns()))  # a touched source file is re-read
    packed_rows("data", src, char, 32, 0.1, tmp_path)
    assert "cached" in capfd.readouterr().err


def test_shorter_seq_len_splits_cached_rows_and_longer_is_refused(corpus, tmp_path):
    cfg = packed(tmp_path, path=str(corpus["txt"]), split_by="paragraph", pack_len=64)
    long = PackedPipeline(replace(cfg, shuffle=False), batch_size=4, seq_len=64, seed=0)
    short = PackedPipeline(replace(cfg, shuffle=False), batch_size=8, seq_len=32, seed=0)
    assert short.sources[0].n_train == 2 * long.sources[0].n_train
    a, b = long.host_batch(0, np.arange(4)), short.host_batch(0, np.arange(8))
    np.testing.assert_array_equal(b["inputs"].reshape(4, 64), a["inputs"])  # two halves of each cached row
    np.testing.assert_array_equal(b["targets"].reshape(4, 64), a["targets"])
    with pytest.raises(UserError, match="train.seq_len: 128 is larger than the data cache was built for"):
        PackedPipeline(cfg, batch_size=4, seq_len=128, seed=0)

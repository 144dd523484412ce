"""Building the packed cache: the same bytes with 1 and 2 tokenizing processes, one stream per split (no padding
where shards or the old 1,000-document batches ended), rows that decode back to the documents, and on a
multi-host run one builder per cache folder whose error every process reports."""
import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import data.build
from data.cache import packed_rows
from data.config import DataConfig, SourceConfig
from data.packed import PackedPipeline
from data.sources import load_documents, split_documents
from data.tokenize import SPECIALS, BPETokenizer, CharTokenizer
from data_helpers import mixture, paragraphs, write_corpus
from helpers import REPO, cli_env, free_port

PACK_LEN = 32
SHARD_BYTES = 8 << 10  # ~25 shards of the corpus below: the stream crosses many shard boundaries


class CountingPool(data.build.ProcessPoolExecutor):
    """The real pool, counted: a build that never started one would make the comparison below vacuous."""
    started = 0

    def __init__(self, *args, **kwargs):
        CountingPool.started += 1
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build")
    path = folder / "corpus.txt"  # 1,500 paragraphs (~200 KB): the train split spans the old batch of 1,000
    path.write_text("\n\n".join(paragraphs(1500)) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizers(corpus):
    docs = [p for p in corpus.read_text().split("\n\n") if p.strip()]
    return {"char": CharTokenizer.fit(corpus.read_text(), SPECIALS), "bpe": BPETokenizer.train([docs], 400)}


def _build(corpus, tokenizer, root, num_proc):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data.build, "SHARD_BYTES", SHARD_BYTES)
        mp.setattr(data.build, "ProcessPoolExecutor", CountingPool)
        src = SourceConfig(str(corpus), split_by="paragraph")
        train, val, meta = packed_rows("data", src, tokenizer, PACK_LEN, 0.1, root, num_proc=num_proc)
    folder = next((root / "packed").glob("*/tok-*"))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    return train, val, meta, files, json.loads((folder / "build.json").read_text())


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_cache_files_are_byte_identical_with_one_and_two_processes(kind, corpus, tokenizers, tmp_path):
    started = CountingPool.started
    *_, one, built_one = _build(corpus, tokenizers[kind], tmp_path / "one", num_proc=1)
    assert CountingPool.started == started  # one process: no pool
    *_, two, built_two = _build(corpus, tokenizers[kind], tmp_path / "two", num_proc=2)
    assert CountingPool.started == started + 1  # two: a pool of workers tokenized the shards
    assert set(one) == {"train.arrow", "val.arrow", "meta.json", "build.json"}
    # build.json (seconds, processes, builder) is the one file allowed to differ
    assert {k: v for k, v in one.items() if k != "build.json"} == {k: v for k, v in two.items() if k != "build.json"}
    assert (built_one["num_proc"], built_two["num_proc"], built_two["built_by"]) == (1, 2, 0)


def _reference_rows(token_docs: list[np.ndarray], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows cut from the whole split's stream at once: row r = stream[r * L : r * L + L + 1], the last padded."""
    stream = np.concatenate(token_docs)
    segments = np.repeat(np.arange(1, len(token_docs) + 1), [len(d) for d in token_docs])
    n = -(-(len(stream) - 1) // PACK_LEN)
    padded = np.full(n * PACK_LEN + 1, pad), np.zeros(n * PACK_LEN + 1, np.int64)
    padded[0][:len(stream)], padded[1][:len(stream)] = stream, segments
    index = np.arange(n)[:, None] * PACK_LEN + np.arange(PACK_LEN + 1)
    return padded[0][index], padded[1][index]


def test_a_split_is_one_stream_across_shards_and_decodes_back_to_its_documents(corpus, tokenizers, tmp_path):
    tok = tokenizers["bpe"]
    train, val, meta, *_ = _build(corpus, tok, tmp_path, num_proc=2)
    eos, pad = tok.special_id("<eos>"), tok.special_id("<pad>")
    docs = split_documents(load_documents("data", SourceConfig(str(corpus), split_by="paragraph"), tmp_path / "hf"),
                           0.1, "data")
    assert meta["train_documents"] == len(docs[0]) > 1000 and meta["val_documents"] == len(docs[1])
    for store, split in zip((train, val), docs):
        texts = split["text"]
        rows = np.arange(store.n_rows)
        tokens, segments = store.gather(rows, rows * 0, PACK_LEN + 1)
        want_tokens, want_segments = _reference_rows([np.append(t, eos) for t in tok.encode_batch(texts)], pad)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(segments, want_segments)
        assert (segments[:-1] > 0).all()  # padding only in the split's last row
        np.testing.assert_array_equal(store.first_doc, segments[:, 0] - 1)
        stream = np.concatenate([tokens[0]] + [t[1:] for t in tokens[1:]])  # rows overlap by one token
        seg_stream = np.concatenate([segments[0]] + [s[1:] for s in segments[1:]])
        assert tok.decode(stream[seg_stream > 0]) == "".join(t + "<eos>" for t in texts)


def test_num_proc_must_not_be_negative():
    with pytest.raises(ValueError, match="data.num_proc"):
        DataConfig(num_proc=-1)


def test_bench_data_tokenize_reports_both_settings(tmp_path, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.setattr(data.build, "SHARD_BYTES", 64 << 10)
    assert main(["bench-data", "tokenize", "--mb", "0.3", "--tokenizer", "char", "--num-proc", "1,2",
                 "--json", str(tmp_path / "bench.json")]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["num_proc"], r["identical"]) for r in result["best"]] == [(1, True), (2, True)]
    assert result["corpus_mb"] >= 0.3 and result["best"][0]["mb_per_s"] > 0 and result["cpu"]
    assert "identical" in capsys.readouterr().out


WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, spec, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from pathlib import Path
    import numpy as np
    from data.cache import packed_rows
    from data.config import DataConfig, SourceConfig
    from data.packed import PackedPipeline
    from data.tokenize import SPECIALS, CharTokenizer
    from parallel.errors import UserError
    spec["sources"] = tuple(SourceConfig(**s) for s in spec["sources"])
    result = {}
    # 1. one shared cache folder: one process fits the tokenizer and builds the rows, both read the same rows
    pipe = PackedPipeline(DataConfig(**spec), batch_size=4, seq_len=16, seed=3)
    result["batches"] = [{k: v.tolist() for k, v in pipe.host_batch(s, np.arange(4)).items()} for s in range(3)]
    pipe.close()
    # 2. a cache folder per process (as hosts without a shared disk): each builds its own
    src = spec["sources"][0]
    tok = CharTokenizer.fit(open(src.path).read(), SPECIALS)
    packed_rows("data", src, tok, 16, 0.1, Path(spec["cache_dir"]) / f"own{pid}")
    # 3. the builder fails (a tokenizer without the corpus's characters): every process raises its error
    try:
        packed_rows("data", src, CharTokenizer.fit("abc", SPECIALS), 16, 0.1, Path(spec["cache_dir"]))
        result["error"] = None
    except UserError as e:
        result["error"] = str(e)
    open(out, "w").write(json.dumps(result))
""")


def test_multi_host_one_builder_per_cache_folder_and_its_error_everywhere(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=150)["txt"]
    cfg = mixture(tmp_path / "cache", corpus, objective="causal")
    spec = {**cfg.__dict__, "sources": [s.__dict__ for s in cfg.sources]}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), json.dumps(spec),
                               str(tmp_path / f"out{i}.json")], cwd=REPO, env=cli_env(devices=1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        logs.append(out)
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]

    shared = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "packed").glob("*/tok-*/build.json")]
    assert [b["built_by"] for b in shared] == [0]  # the shared folder: built once, by process 0
    def built_shared(log):
        return [line for line in log.splitlines() if "cached" in line and f"{tmp_path / 'cache' / 'packed'}/" in line]
    assert len(built_shared(logs[0])) == 1 and not built_shared(logs[1])
    assert "process 1 waits for process 0" in logs[1]
    assert "fitted a char tokenizer" in logs[0] and "fitted" not in logs[1]  # the tokenizer too: fitted once
    single = PackedPipeline(cfg, batch_size=4, seq_len=16, seed=3)  # reads that cache: no build here
    for step in range(3):
        want = single.host_batch(step, np.arange(4))
        for r in results:
            for k, v in want.items():
                np.testing.assert_array_equal(np.asarray(r["batches"][step][k]), v, err_msg=f"step {step} {k}")

    for i in range(2):  # separate folders: each process built its own
        built = json.loads(next((tmp_path / "cache" / f"own{i}" / "packed").glob("*/tok-*/build.json")).read_text())
        assert built["built_by"] == i

    assert results[0]["error"] == results[1]["error"] and "outside the tokenizer's vocabulary" in results[0]["error"]
    assert "\n" not in results[0]["error"]

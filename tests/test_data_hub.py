"""Hub datasets as sources (`hf:NAMESPACE/NAME[/CONFIG][:SPLIT]`): a dataset put into a local HuggingFace cache in
the test loads by name with no network, in process and through `meshforge train`; offline mode is a setting.

The caches are made the way HuggingFace's own tools leave them, never by hand-written Arrow files:
- datasets' prepared Arrow cache (what an online `load_dataset("ns/name")` writes: NAMESPACE___NAME/CONFIG/
  VERSION/REVISION/), written here by a datasets builder given the hub load's repo_id, config and revision;
- the hub's file cache (what `hf download --repo-type dataset` writes: datasets--NAMESPACE--NAME/refs/main and
  snapshots/REVISION/).
"""
import json
import socket

import numpy as np
import pytest

from data import hub
from data.config import SourceConfig
from data.sources import check_field, fingerprint, load_documents
from data_helpers import paragraphs
from helpers import meshforge
from parallel.errors import UserError

REPO = "someone/TinyStories"
REV_A, REV_B = "a" * 40, "b" * 40


def _stories(tag: str, n: int):
    for i, p in enumerate(paragraphs(n)):
        yield {"story": f"{tag} {p}", "n": i}


def save_to_datasets_cache(cache, repo: str, config: str, revision: str, tag: str, n: int = 40) -> None:
    """Prepare `repo` (its `config`, split train) in datasets' Arrow cache as an online load of that revision does."""
    from datasets.packaged_modules.generator.generator import Generator

    Generator(cache_dir=str(cache), dataset_name=repo.split("/")[-1], repo_id=repo, hash=revision,
              config_name=config, config_id=config, generator=_stories,
              gen_kwargs={"tag": tag, "n": n}).download_and_prepare()


def save_to_hub_cache(hub_cache, repo: str, revision: str, splits: dict[str, list[str]]) -> None:
    """A dataset repository's files in the hub's file cache, as `hf download --repo-type dataset` leaves them."""
    folder = hub_cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    data = folder / "snapshots" / revision / "data"
    data.mkdir(parents=True)
    for split, texts in splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HF caches in tmp (never ~/.cache), offline from the environment, and no socket may connect."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for module, name in [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after apply_offline changes them
    monkeypatch.setitem(hub._setting, "offline", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(sock, address):
        raise AssertionError(f"a test tried to connect to {address}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    hub._resolve.cache_clear()
    yield tmp_path
    hub._resolve.cache_clear()


def _texts(path: str, cache_root, field: str = "story") -> list[str]:
    return list(load_documents("data", SourceConfig(path, text_field=field), cache_root / "mf")["text"])


def test_names_parse_by_the_grammar():
    cases = {"hf:roneneldan/TinyStories": ("roneneldan/TinyStories", None, "train"),
             "hf:roneneldan/TinyStories:validation": ("roneneldan/TinyStories", None, "validation"),
             "hf:Salesforce/wikitext/wikitext-2-raw-v1:test": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
             "hf:imdb:test[:10%]": ("imdb", None, "test[:10%]")}
    for path, want in cases.items():
        got = hub.parse("data", path)
        assert (got.repo, got.config, got.split) == want, path
    for bad in ("hf:", "hf:a/b/c/d", "hf:a//b", "hf:a/b:", "hf:a/b:tr ain"):
        with pytest.raises(UserError, match=r"^data\.path: write a hub dataset as"):
            hub.parse("data", bad)


def test_a_cached_dataset_loads_by_name_with_no_network(caches):
    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_A, "plain")
    save_to_datasets_cache(caches / "datasets", REPO, "upper", REV_A, "UPPER", n=30)
    want = [f"plain {p}" for p in paragraphs(40)]
    assert _texts(f"hf:{REPO}/default", caches) == want
    assert _texts(f"hf:{REPO}/default:train[:5]", caches) == want[:5]
    assert _texts(f"hf:{REPO}/upper:train", caches) == [f"UPPER {p}" for p in paragraphs(30)]
    fp = fingerprint("data", SourceConfig(f"hf:{REPO}/upper"))["hub"]
    assert fp == {"repo": REPO, "config": "upper", "split": "train", "revision": REV_A, "version": "0.0.0"}
    check_field("data", SourceConfig(f"hf:{REPO}/upper"), "n", "outer.partition_key")
    with pytest.raises(UserError, match="'label' is not a field of data"):
        check_field("data", SourceConfig(f"hf:{REPO}/upper"), "label", "outer.partition_key")


def test_a_new_revision_changes_the_fingerprint_and_the_documents(caches):
    """The packed-row cache is keyed by the source's fingerprint: a newer revision in the cache must change it."""
    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_A, "old", n=10)
    before = fingerprint("data", SourceConfig(f"hf:{REPO}"))
    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_B, "new", n=10)
    hub._resolve.cache_clear()  # (a new process)
    after = fingerprint("data", SourceConfig(f"hf:{REPO}"))
    assert (before["hub"]["revision"], after["hub"]["revision"]) == (REV_A, REV_B)
    assert _texts(f"hf:{REPO}", caches)[0].startswith("new ")


def test_a_hub_file_cache_snapshot_loads_offline(caches):
    save_to_hub_cache(caches / "hub", "someone/Snap", REV_B, {"train": ["one", "two", "", "three"],
                                                              "test": ["held out"]})
    assert _texts("hf:someone/Snap", caches, "text") == ["one", "two", "three"]  # (empty documents dropped)
    assert _texts("hf:someone/Snap:test", caches, "text") == ["held out"]
    assert fingerprint("data", SourceConfig("hf:someone/Snap"))["hub"]["revision"] == REV_B


def test_bad_hub_sources_are_one_line_user_errors(caches):
    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_A, "plain", n=10)
    cases = {f"hf:{REPO}:test": "has no split 'test' (its splits: train)",
             f"hf:{REPO}/nope": "config 'nope'",
             "hf:someone/Missing": "is not in the HuggingFace datasets cache"}
    for path, msg in cases.items():
        with pytest.raises(UserError) as e:
            _texts(path, caches)
        assert msg in str(e.value) and str(e.value).startswith("data.path: ") and "\n" not in str(e.value), path
    with pytest.raises(UserError, match=r"^data\.text_field: .* has no column 'text'; its columns: story, n"):
        _texts(f"hf:{REPO}", caches, "text")


def test_offline_is_a_setting_switched_at_run_time(caches, monkeypatch):
    """data.hf_offline sets both libraries' offline globals (read from the environment only at import), and the
    environment's offline variables win over a false setting."""
    import datasets.config
    import huggingface_hub.constants

    for var in hub.ENV_OFFLINE:
        monkeypatch.delenv(var, raising=False)
    hub.set_offline(False)
    assert not datasets.config.HF_HUB_OFFLINE and not huggingface_hub.constants.HF_HUB_OFFLINE
    hub.set_offline(True)
    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(UserError, match="not in the HuggingFace datasets cache .* and data.hf_offline is true"):
        _texts("hf:someone/Missing", caches)  # refused without a connection (the socket guard would fail it)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub.set_offline(False)
    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE


def test_meshforge_trains_on_a_cached_hub_dataset_and_refuses_a_missing_one(tmp_path):
    """End to end in a fresh process: HF_HOME points at a cache made here; a missing name is exit 2, one line."""
    hf_home = tmp_path / "hf"
    save_to_datasets_cache(hf_home / "datasets", REPO, "default", REV_A, "story", n=120)
    env = {"HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets"), "HF_HUB_OFFLINE": "1"}
    common = ["experiments/shakespeare_char.py", "--data.mode", "packed", "--data.text_field", "story",
              "--data.cache_dir", tmp_path / "mf", "--model.d_model", "32", "--model.n_layers", "1",
              "--model.n_heads", "2", "--train.seq_len", "32", "--train.batch_size", "4", "--train.steps", "4",
              "--train.eval_every", "4", "--train.eval_batches", "1", "--train.log_every", "2",
              "--optim.warmup_steps", "1", "--log.progress", "lines", "--log.tensorboard", "false"]
    r = meshforge("train", *common, "--data.path", f"hf:{REPO}", "--workdir", tmp_path / "run", env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["val_loss"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["path"] == f"hf:{REPO}"

    r = meshforge("train", *common, "--data.path", "hf:someone/Missing", "--data.hf_offline", "true",
                  "--workdir", tmp_path / "missing", env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "data.path: hf:someone/Missing is not in the HuggingFace datasets cache" in lines[0], lines[0]


# --- streaming (hf:...?streaming=1) ---------------------------------------------------------------------------

def _stream_pipeline(cache_root, path: str = f"hf:{REPO}?streaming=1", **kw):
    from data.packed import PackedPipeline
    from data_helpers import packed

    cfg = packed(cache_root / "mf", **{"path": path, "tokenizer": "byte", "text_field": "story",
                                       "synthetic_val_rows": 3, **kw})
    return PackedPipeline(cfg, batch_size=4, seq_len=32, seed=0)


def _expected_windows(tok, texts: list[str], n_val: int, length: int, n: int):
    """The stream cut as data/stream.py promises: windows of length + 1 every `length` tokens; training from
    the first document after the validation windows, again from there when the stream ends."""
    docs = [list(tok.encode(t)) + [tok.special_id("<eos>")] for t in texts]
    starts = np.cumsum([0] + [len(d) for d in docs])
    tokens, doc_of = np.concatenate(docs), np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    train_at = int(starts[np.searchsorted(starts, n_val * length)])
    per_epoch = (len(tokens) - train_at - (length + 1)) // length + 1
    out_tokens, out_segments = [], []
    for i in range(n):
        at = train_at + (i % per_epoch) * length
        out_tokens.append(tokens[at:at + length + 1])
        d = doc_of[at:at + length + 1]
        out_segments.append(np.concatenate([[1], 1 + np.cumsum(d[1:] != d[:-1])]))
    return np.stack(out_tokens), np.stack(out_segments), per_epoch


def test_a_streamed_source_reads_in_order_and_wraps_at_its_end(caches, monkeypatch):
    import data.stream

    monkeypatch.setattr(data.stream, "DOCS_PER_READ", 8)  # many reads (and dataset states) in a small stream
    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_A, "s", n=40)
    pipe = _stream_pipeline(caches)
    src = pipe.sources[0]
    texts = [f"s {p}" for p in paragraphs(40)]
    want_tokens, want_segments, per_epoch = _expected_windows(pipe.tokenizer, texts, 3, 32, 1)
    n = per_epoch + 5  # into the second epoch
    want_tokens, want_segments, _ = _expected_windows(pipe.tokenizer, texts, 3, 32, n)
    got = src.train_windows(np.arange(n))
    np.testing.assert_array_equal(got.tokens, want_tokens)
    np.testing.assert_array_equal(got.segment_ids, want_segments)
    first = np.concatenate([pipe.tokenizer.encode(texts[0]), [pipe.tokenizer.special_id("<eos>")]])
    np.testing.assert_array_equal(src.val_windows(np.arange(1)).tokens[0], first[:33])  # validation: the head
    assert src.n_train is None and src.n_val == 3


def test_a_streamed_source_resumes_at_its_position(caches, monkeypatch, capsys):
    """A new pipeline restored from a checkpoint's state gives the same batches, reopening the stream at the saved
    dataset state (no reading from the start), also in a mixture and across the end of the stream."""
    import data.stream

    monkeypatch.setattr(data.stream, "DOCS_PER_READ", 8)
    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_A, "s", n=40)
    mixture = (SourceConfig(f"hf:{REPO}?streaming=1", 3.0, text_field="story"),
               SourceConfig("synthetic:addition?digits=2", 1.0))
    for kw in ({}, {"sources": mixture}):
        first = _stream_pipeline(caches, **kw)
        rows = np.arange(4)
        steps = range(60, 90)  # (171 windows an epoch: alone, the stream's second epoch ends in these steps)
        want = [first.host_batch(s, rows) for s in steps]
        state = json.loads(json.dumps(first.state(70)))  # (as the checkpoint stores it)
        cursor = state["streams"]["data" if not kw else "data.sources[0]"]
        assert cursor["state"] is not None and cursor["window"] > 0
        resumed = _stream_pipeline(caches, **kw)
        resumed.restore(state)
        for s, batch in zip(steps[10:], want[10:]):
            got = resumed.host_batch(s, rows)
            assert all(np.array_equal(got[k], batch[k]) for k in batch), (kw, s)
        assert "reading up to it" not in capsys.readouterr().err


def test_streamed_sources_validate_on_their_head_and_refuse_whole_reads(caches):
    from data.packed import PackedPipeline
    from data_helpers import packed

    save_to_datasets_cache(caches / "datasets", REPO, "default", REV_A, "s", n=10)
    with pytest.raises(UserError, match=r"is streamed.*data\.tokenizer byte or data\.tokenizer_path"):
        PackedPipeline(packed(caches / "mf", path=f"hf:{REPO}?streaming=1", tokenizer="char", text_field="story"),
                       batch_size=4, seq_len=32, seed=0)  # a char tokenizer is fitted to the whole corpus
    held_out = _stream_pipeline(caches, val_sources=(SourceConfig(f"hf:{REPO}?streaming=1", text_field="story"),))
    assert held_out.val_sources[0].n_val == 3  # a streamed validation source: its first windows, as in training
    np.testing.assert_array_equal(held_out.val_sources[0].val_windows(np.arange(3)).tokens,
                                  held_out.sources[0].val_windows(np.arange(3)).tokens)
    with pytest.raises(UserError, match=r"has fewer than 1001 windows"):
        _stream_pipeline(caches, synthetic_val_rows=1000)

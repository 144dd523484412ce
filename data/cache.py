"""The on-disk cache: fitted tokenizers, and each source's tokenized, packed rows (Arrow files, memory-mapped).

    CACHE/tokenizers/{char,bpe}-<hash of sources + settings>.json
    CACHE/packed/<source>-<hash of source + settings>/tok-<tokenizer fingerprint>/
        {train,val}.arrow  meta.json  build.json

A second run with the same sources, tokenizer and settings memory-maps the rows it finds (tens of ms). The
tokenizer's fingerprint is part of the path, so rows tokenized by another tokenizer are never reused; when they
exist the rebuild says so. Builds go to a temporary folder renamed into place, so processes that build the same
cache at once never see a half-written one.

Rows are built with `data.num_proc` processes (data/build.py) and are byte-identical whatever that number is; only
build.json (seconds taken, processes used, which process of the run built it) differs. On a multi-host run one
process per cache folder builds while the others wait (data/build_once.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from data import hub
from data.build import build_rows, local_cores
from data.build_once import build_once, process_count, process_index
from data.config import DataConfig, SourceConfig
from data.hashing import digest
from data.sources import hf_datasets, fingerprint as source_fingerprint, load_documents, source_kind, split_documents
from data.synthetic import Task, make_task
from data.tokenize import (SPECIALS, BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, fingerprint,
                           load_tokenizer, save_tokenizer)
from parallel.errors import UserError

VERSION = 1  # bump when the row format changes: old caches are then rebuilt, never misread
# packed rows only (2: each row's first document, for federated label partitions; 3: one stream per split, no
# padding between batches of documents, rows in {split}.arrow)
ROWS_VERSION = 3


def log(msg: str) -> None:
    print(f"meshforge: {msg}", file=sys.stderr, flush=True)


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MESHFORGE_CACHE") or "~/.cache/meshforge"
    return Path(root).expanduser()


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path.split("?")[0]).name or path)[:40]


# --- tokenizers -------------------------------------------------------------------------------------------------

def tokenizer_key(cfg: DataConfig) -> str:
    """The file name of the tokenizer the data section builds: a hash of what it depends on."""
    parts = []
    for key, src in cfg.source_list():
        if source_kind(src.path) == "synthetic":
            parts.append({"synthetic": src.path})
        else:
            parts.append(source_fingerprint(key, src))
    deps = {"version": VERSION, "kind": cfg.tokenizer, "specials": list(SPECIALS), "sources": parts}
    if cfg.tokenizer == "char" and cfg.val_sources:  # their characters join the vocabulary (see fit_tokenizer)
        deps["val_sources"] = [{"synthetic": s.path} if source_kind(s.path) == "synthetic" else
                               source_fingerprint(k, s) for k, s in cfg.val_source_list()]
    if cfg.objective == "sft":  # fitted to the rendered examples (keys only added here: other caches keep names)
        deps["sft"] = [cfg.prompt_field, cfg.response_field, cfg.messages_field, cfg.sft_template]
    if cfg.tokenizer == "bpe":
        deps.update(vocab_size=cfg.bpe_vocab_size, val_fraction=cfg.val_fraction)
    return f"{cfg.tokenizer}-{digest(deps)}.json"


def _source_texts(cfg: DataConfig, root: Path, split: str):
    """Batches of document texts from every file/generator source (split 'train', or 'all': validation sources too)."""
    for key, src in cfg.source_list() + (cfg.val_source_list() if split == "all" else ()):
        if source_kind(src.path) == "synthetic":
            continue
        if cfg.objective == "sft":  # rows of prompts and responses, rendered by data.sft_template
            from data.sft_examples import example_texts  # it imports this module

            yield from example_texts(key, src, cfg, root / "hf", train_only=split == "train")
            continue
        docs = load_documents(key, src, root / "hf")
        if split == "train":
            docs = split_documents(docs, cfg.val_fraction, key)[0]
        for batch in docs.iter(batch_size=1000):
            yield batch["text"]


def _tasks(cfg: DataConfig, with_val: bool = False) -> list[Task]:
    pairs = cfg.source_list() + (cfg.val_source_list() if with_val else ())
    return [make_task(key, src.path) for key, src in pairs if source_kind(src.path) == "synthetic"]


def fit_tokenizer(cfg: DataConfig, root: Path) -> Tokenizer:
    """Fit the configured tokenizer to the sources: char = every character seen, bpe = trained on the train split."""
    tasks = _tasks(cfg)
    if cfg.tokenizer == "char":  # a validation source's characters too: text it cannot encode is not evaluated
        chars = set("".join(t.alphabet for t in _tasks(cfg, with_val=True)))
        for texts in _source_texts(cfg, root, "all"):
            for text in texts:
                chars.update(text)
        return CharTokenizer.fit("".join(chars), SPECIALS)
    if cfg.tokenizer == "bpe":
        def batches():
            yield from _source_texts(cfg, root, "train")
            for task in tasks:  # task text takes part in the merges through a sample of its problems
                rng = np.random.default_rng(0)
                yield ["".join(task.sample(rng)) for _ in range(2000)]
        return BPETokenizer.train(batches(), cfg.bpe_vocab_size)
    return ByteTokenizer(SPECIALS)


def get_tokenizer(cfg: DataConfig, retrain: bool = False) -> tuple[Tokenizer, Path | None]:
    """The data section's tokenizer (from data.tokenizer_path, the cache, or fitted now) and its cache file."""
    hub.set_offline(cfg.hf_offline)  # fitting may read hub sources
    if cfg.tokenizer_path:
        return load_tokenizer(Path(cfg.tokenizer_path)), Path(cfg.tokenizer_path)
    if cfg.tokenizer == "byte":
        return ByteTokenizer(SPECIALS), None
    root = cache_root(cfg)
    path = root / "tokenizers" / tokenizer_key(cfg)
    if path.is_file() and not retrain and process_count() == 1:
        return load_tokenizer(path), path

    def fit(stop: threading.Event | None) -> None:
        t0 = time.perf_counter()
        tok = fit_tokenizer(cfg, root)
        save_tokenizer(tok, path)
        log(f"fitted a {cfg.tokenizer} tokenizer ({tok.vocab_size} ids) in {time.perf_counter() - t0:.1f}s: {path}")

    if retrain:  # `meshforge tokenizer train`: one process
        fit(None)
    else:  # on a multi-host run, one process per cache folder fits it while the others wait
        build_once(path.is_file, fit, path.parent, f"the {cfg.tokenizer} tokenizer", log)
    return load_tokenizer(path), path


# --- packed rows ------------------------------------------------------------------------------------------------

class RowStore:
    """One split's packed rows, memory-mapped: windows are copied out of the Arrow buffers, never the whole table."""

    def __init__(self, ds):
        table = ds.data.table
        self.n_rows = table.num_rows
        self.row_len = ds.features["tokens"].length
        self._tokens = [np.asarray(c.flatten()).reshape(-1, self.row_len) for c in table.column("tokens").chunks]
        self._segments = [np.asarray(c.flatten()).reshape(-1, self.row_len)
                          for c in table.column("segment_ids").chunks]
        self._starts = np.cumsum([0] + [len(c) for c in self._tokens])
        # the split's document index of each row's first token (federated label partitions)
        self.first_doc = np.asarray(table.column("first_doc").to_numpy()) if "first_doc" in ds.features else None

    def gather(self, rows: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens and segment ids (len(rows), length): row rows[i] from column starts[i]."""
        tokens = np.empty((len(rows), length), np.int32)
        segments = np.empty((len(rows), length), np.int32)
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        for i, (c, r, s) in enumerate(zip(chunk, rows - self._starts[chunk], starts)):
            tokens[i] = self._tokens[c][r, s:s + length]
            segments[i] = self._segments[c][r, s:s + length]
        return tokens, segments

    def documents_at(self, rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """The split's index of the document holding token starts[i] of row rows[i] (the row's last document
        where that token is padding): segment ids count documents up from the row's first one."""
        rows, starts = np.asarray(rows, np.int64), np.asarray(starts, np.int64)
        out = np.empty(len(rows), np.int64)
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        for c in np.unique(chunk):
            at = np.flatnonzero(chunk == c)
            local, segments = rows[at] - self._starts[c], self._segments[c]
            seg_at, seg_first = segments[local, starts[at]], segments[local, 0]
            pad = seg_at == 0
            if pad.any():  # (only the last row of a split ends in padding)
                seg_at[pad] = segments[local[pad]].max(1)
            out[at] = self.first_doc[rows[at]] + seg_at - seg_first
        return out


def _cached_meta(final: Path, settings: dict, tok_fp: str) -> dict | None:
    """The meta of a complete cache at `final` built for these settings and tokenizer, else None."""
    try:
        meta = json.loads((final / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = meta.get("settings") == settings and meta.get("tokenizer") == tok_fp
    return meta if ok and all((final / f"{split}.arrow").is_file() for split in ("train", "val")) else None


def _load_rows(final: Path) -> tuple[RowStore, RowStore]:
    datasets = hf_datasets()
    return (RowStore(datasets.Dataset.from_file(str(final / "train.arrow"))),
            RowStore(datasets.Dataset.from_file(str(final / "val.arrow"))))


def packed_rows(key: str, src: SourceConfig, tokenizer: Tokenizer, pack_len: int, val_fraction: float,
                root: Path, num_proc: int = 0) -> tuple[RowStore, RowStore, dict]:
    """(train rows, validation rows, meta) of a file/generator source: from the cache, or built and cached now.

    num_proc: processes that tokenize (0: every local core); the rows, and the cache's name, do not depend on it.
    Every process of a multi-host run calls this at the same point: one per cache folder builds (build_once)."""
    settings = {"version": ROWS_VERSION, "source": source_fingerprint(key, src), "pack_len": pack_len,
                "val_fraction": val_fraction}
    tok_fp = fingerprint(tokenizer)
    source_dir = root / "packed" / f"{_slug(src.path)}-{digest(settings)}"
    final = source_dir / f"tok-{tok_fp}"
    meta = _cached_meta(final, settings, tok_fp)
    if meta is not None and process_count() == 1:
        return (*_load_rows(final), meta)

    def build(stop: threading.Event | None) -> None:
        if (final / "meta.json").is_file() and _cached_meta(final, settings, tok_fp) is None:
            log(f"{final} does not match this source and tokenizer; rebuilding it")
            shutil.rmtree(final, ignore_errors=True)
        others = [p.name.removeprefix("tok-") for p in source_dir.glob("tok-*")] if source_dir.is_dir() else []
        t0 = time.perf_counter()
        docs = load_documents(key, src, root / "hf")
        splits = dict(zip(("train", "val"), split_documents(docs, val_fraction, key)))
        tmp = source_dir / f".build-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        try:
            processes = num_proc or local_cores()
            counts = build_rows(splits, tokenizer, pack_len, tmp, processes, stop)
            built = {"settings": settings, "tokenizer": tok_fp, "tokenizer_kind": tokenizer.kind, "path": src.path,
                     **counts}
            seconds = round(time.perf_counter() - t0, 2)
            (tmp / "meta.json").write_text(json.dumps(built, indent=1))
            # how it was built: the one file that differs between builds of the same rows
            (tmp / "build.json").write_text(json.dumps({"build_s": seconds, "num_proc": processes,
                                                        "built_by": process_index()}, indent=1))
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same build first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        why = f" (the tokenizer changed: rows exist for {', '.join(others)}, this one is {tok_fp})" if others else ""
        log(f"cached {built['train_rows']} + {built['val_rows']} packed rows of {src.path} in {seconds}s with "
            f"{processes} process{'es' if processes > 1 else ''}{why}: {final}")

    build_once(lambda: _cached_meta(final, settings, tok_fp) is not None, build, source_dir,
               f"the packed rows of {src.path}", log)
    return (*_load_rows(final), _cached_meta(final, settings, tok_fp))


def check_seq_len(seq_len: int, pack_len: int) -> None:
    if seq_len > pack_len:
        raise UserError(f"train.seq_len: {seq_len} is larger than the data cache was built for (data.pack_len "
                        f"{pack_len}); lower train.seq_len, or raise data.pack_len (0 follows train.seq_len) and "
                        "the cache is rebuilt")

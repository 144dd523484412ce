"""The on-disk cache: fitted tokenizers, and each source's tokenized, packed rows (`datasets.save_to_disk`).

    CACHE/tokenizers/{char,bpe}-<hash of sources + settings>.json
    CACHE/packed/<source>-<hash of source + settings>/tok-<tokenizer fingerprint>/{train,val,meta.json}

A second run with the same sources, tokenizer and settings memory-maps the rows it finds (tens of ms). The
tokenizer's fingerprint is part of the path, so rows tokenized by another tokenizer are never reused; when they
exist the rebuild says so. Builds go to a temporary folder renamed into place, so processes that build the same
cache at once (hosts of one run) never see a half-written one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from data.config import DataConfig, SourceConfig
from data.hashing import digest
from data.packing import pack_documents
from data.sources import hf_datasets, fingerprint as source_fingerprint, load_documents, source_kind, split_documents
from data.synthetic import Task, make_task
from data.tokenize import (SPECIALS, BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, fingerprint,
                           load_tokenizer, save_tokenizer)
from parallel.errors import UserError

VERSION = 1  # bump when the row format changes: old caches are then rebuilt, never misread
ROWS_VERSION = 2  # packed rows only (2: each row's first document, for federated label partitions)


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
    if cfg.objective == "sft":  # fitted to the rendered examples (keys only added here: other caches keep names)
        deps["sft"] = [cfg.prompt_field, cfg.response_field, cfg.messages_field, cfg.sft_template]
    if cfg.tokenizer == "bpe":
        deps.update(vocab_size=cfg.bpe_vocab_size, val_fraction=cfg.val_fraction)
    return f"{cfg.tokenizer}-{digest(deps)}.json"


def _source_texts(cfg: DataConfig, root: Path, split: str):
    """Batches of document texts from every file/generator source (split 'train' or 'all')."""
    for key, src in cfg.source_list():
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


def _tasks(cfg: DataConfig) -> list[Task]:
    return [make_task(key, src.path) for key, src in cfg.source_list() if source_kind(src.path) == "synthetic"]


def fit_tokenizer(cfg: DataConfig, root: Path) -> Tokenizer:
    """Fit the configured tokenizer to the sources: char = every character seen, bpe = trained on the train split."""
    tasks = _tasks(cfg)
    if cfg.tokenizer == "char":
        chars = set("".join(t.alphabet for t in tasks))
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
    if cfg.tokenizer_path:
        return load_tokenizer(Path(cfg.tokenizer_path)), Path(cfg.tokenizer_path)
    if cfg.tokenizer == "byte":
        return ByteTokenizer(SPECIALS), None
    root = cache_root(cfg)
    path = root / "tokenizers" / tokenizer_key(cfg)
    if path.is_file() and not retrain:
        return load_tokenizer(path), path
    t0 = time.perf_counter()
    tok = fit_tokenizer(cfg, root)
    save_tokenizer(tok, path)
    log(f"fitted a {cfg.tokenizer} tokenizer ({tok.vocab_size} ids) in {time.perf_counter() - t0:.1f}s: {path}")
    return tok, path


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
            if pad.any():  # (only the last row of a packing batch ends in padding)
                seg_at[pad] = segments[local[pad]].max(1)
            out[at] = self.first_doc[rows[at]] + seg_at - seg_first
        return out


def _pack_batch(batch, indices, tokenizer: Tokenizer, pack_len: int):
    eos, pad = tokenizer.special_id("<eos>"), tokenizer.special_id("<pad>")
    docs = [np.append(ids, eos).astype(np.int32) for ids in tokenizer.encode_batch(batch["text"])]
    tokens, segments = pack_documents(docs, pack_len, pad)
    # a row starts inside the stream, never in padding: its first segment id names a document of this batch
    return {"tokens": tokens, "segment_ids": segments,
            "first_doc": np.asarray(indices, np.int64)[segments[:, 0] - 1]}


def packed_rows(key: str, src: SourceConfig, tokenizer: Tokenizer, pack_len: int, val_fraction: float,
                root: Path) -> tuple[RowStore, RowStore, dict]:
    """(train rows, validation rows, meta) of a file/generator source: from the cache, or built and cached now."""
    datasets = hf_datasets()
    settings = {"version": ROWS_VERSION, "source": source_fingerprint(key, src), "pack_len": pack_len,
                "val_fraction": val_fraction}
    tok_fp = fingerprint(tokenizer)
    source_dir = root / "packed" / f"{_slug(src.path)}-{digest(settings)}"
    final = source_dir / f"tok-{tok_fp}"
    meta_path = final / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings and meta.get("tokenizer") == tok_fp:
            return (RowStore(datasets.load_from_disk(str(final / "train"))),
                    RowStore(datasets.load_from_disk(str(final / "val"))), meta)
        log(f"{final} does not match this source and tokenizer; rebuilding it")
        shutil.rmtree(final, ignore_errors=True)
    others = [p.name.removeprefix("tok-") for p in source_dir.glob("tok-*")] if source_dir.is_dir() else []

    t0 = time.perf_counter()
    docs = load_documents(key, src, root / "hf")
    splits = dict(zip(("train", "val"), split_documents(docs, val_fraction, key)))
    tmp = source_dir / f".build-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    features = datasets.Features({"tokens": datasets.List(datasets.Value("int32"), length=pack_len + 1),
                                  "segment_ids": datasets.List(datasets.Value("int32"), length=pack_len + 1),
                                  "first_doc": datasets.Value("int64")})
    meta = {"settings": settings, "tokenizer": tok_fp, "tokenizer_kind": tokenizer.kind, "path": src.path}
    try:
        for split, ds in splits.items():
            packed = ds.map(_pack_batch, batched=True, batch_size=1000, with_indices=True, remove_columns=["text"],
                            features=features,
                            fn_kwargs={"tokenizer": tokenizer, "pack_len": pack_len},
                            new_fingerprint=f"{digest(settings)}-{tok_fp}-{split}",
                            cache_file_name=str(tmp / f"{split}-map.arrow"))
            packed.save_to_disk(str(tmp / split))
            meta[f"{split}_rows"] = len(packed)
            meta[f"{split}_documents"] = len(ds)
            del packed
            (tmp / f"{split}-map.arrow").unlink(missing_ok=True)
        meta["build_s"] = round(time.perf_counter() - t0, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same build first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    why = f" (the tokenizer changed: rows exist for {', '.join(others)}, this one is {tok_fp})" if others else ""
    log(f"cached {meta['train_rows']} + {meta['val_rows']} packed rows of {src.path} in {meta['build_s']}s{why}: "
        f"{final}")
    return (RowStore(datasets.load_from_disk(str(final / "train"))),
            RowStore(datasets.load_from_disk(str(final / "val"))), meta)


def check_seq_len(seq_len: int, pack_len: int) -> None:
    if seq_len > pack_len:
        raise UserError(f"train.seq_len: {seq_len} is larger than the data cache was built for (data.pack_len "
                        f"{pack_len}); lower train.seq_len, or raise data.pack_len (0 follows train.seq_len) and "
                        "the cache is rebuilt")

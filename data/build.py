"""Building a source's packed rows: documents tokenized by several processes, packed as one stream, written once.

Why this shape: tokenizing is the slow part and splits over documents, while packing must see the documents as
one stream in order (a row holds the end of one piece and the start of the next). So worker processes tokenize
contiguous shards of the documents (about SHARD_BYTES of text each), each writing a shard's ids to a file of its
own, and this process memory-maps them and packs them in shard order, in one sequential pass (data/packing.py
StreamPacker), writing each shard's rows as one Arrow record batch. (Ids through a pipe cost this process a pickled
copy of every token and a thread competing with the packer: for the char tokenizer as much as the tokenizing.)
Shards, rows and record batches depend on the data alone, never on the number of processes, so the files are
byte-identical whatever `num_proc` is. Only a few shards per worker are in flight at once: a corpus larger than
memory streams through.

Workers are not forked from the caller, which may be a training process whose JAX runtime and coordination client
run threads that a fork would copy mid-flight: they fork from multiprocessing's forkserver, a fresh process. Every
process tokenizes with one thread (the Rust `tokenizers` library would otherwise spread each encode_batch over all
cores), so `num_proc` is the number of cores used.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import shutil
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.packing import StreamPacker
from data.tokenize import Tokenizer, tokenizer_from_json

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

SHARD_BYTES = 1 << 20  # text per tokenizing task: small enough to balance 2-16 workers on a 50 MB corpus
IN_FLIGHT = 3  # shards queued per worker: enough to keep it busy while this process packs
POOL_MIN_SHARDS = 4  # smaller sources are tokenized here: starting workers (~0.2 s) would cost more than it saves


class BuildStopped(Exception):
    """The build was asked to stop (another process of the run failed): nothing was written."""


def local_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def row_features(pack_len: int) -> "datasets.Features":
    import datasets

    row = datasets.List(datasets.Value("int32"), length=pack_len + 1)
    return datasets.Features({"tokens": row, "segment_ids": row, "first_doc": datasets.Value("int64")})


# --- tokenizing --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def one_thread():
    """The `tokenizers` library reads TOKENIZERS_PARALLELISM at every call: off, encode_batch uses one thread."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_shard(texts: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): the documents' ids back to back, each followed by <eos>, and each one's length with it.
    ids are uint16 when the vocabulary fits (half the bytes between processes), else int32."""
    docs = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    stream = np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype)
    ids = np.insert(stream, np.cumsum(lengths), tokenizer.special_id("<eos>"))
    return ids, lengths + 1


_worker_tokenizer: Tokenizer | None = None


def _start_worker(spec: dict) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer_from_json(spec)


def _encode_in_worker(texts: "pa.Array", spill: str) -> tuple[str, np.ndarray]:
    """Tokenize one shard; its ids go to the file `spill` (cheaper than a pipe: this process writes them once and
    the packer memory-maps them), only the lengths travel back."""
    ids, lengths = encode_shard(texts.to_pylist(), _worker_tokenizer)
    np.save(spill, ids)
    return spill, lengths


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a fresh single-threaded server process that imported this module once (cheaper than a
    new interpreter per worker, safe where a fork of the caller would not be); spawned where there is no fork."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # (not __main__: a caller's unguarded script is never re-run)
    return ctx


class Encoder:
    """Tokenizes shards in order: in this process, or in up to `processes` worker processes once a split has
    POOL_MIN_SHARDS shards (the pool starts then and serves the later splits too). Workers leave each shard's ids
    in a file under `spill`."""

    def __init__(self, tokenizer: Tokenizer, processes: int, spill: Path):
        self.tokenizer, self.processes, self.spill = tokenizer, max(1, processes), spill
        self._shards = 0
        self._pool: ProcessPoolExecutor | None = None
        self._workers = 0

    def encode(self, shards: Iterator["pa.Array"]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        shards = iter(shards)
        head = list(itertools.islice(shards, max(self.processes, POOL_MIN_SHARDS)))
        if self.processes == 1 or len(head) < (2 if self._pool is not None else POOL_MIN_SHARDS):
            for texts in itertools.chain(head, shards):
                yield encode_shard(texts.to_pylist(), self.tokenizer)
            return
        if self._pool is None:
            self._workers = min(self.processes, len(head))  # a small source needs fewer workers
            self._pool = ProcessPoolExecutor(self._workers, mp_context=worker_context(), initializer=_start_worker,
                                             initargs=(self.tokenizer.to_json(),))
        pending: deque = deque()
        for texts in itertools.chain(head, shards):
            self._shards += 1
            pending.append(self._pool.submit(_encode_in_worker, texts, str(self.spill / f"{self._shards}.npy")))
            if len(pending) >= IN_FLIGHT * self._workers:
                yield self._unspill(pending.popleft().result())
        while pending:
            yield self._unspill(pending.popleft().result())

    @staticmethod
    def _unspill(result: tuple[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        path, lengths = result
        ids = np.load(path, mmap_mode="r")
        os.unlink(path)  # (POSIX: the mapping keeps the data until the packer is done with it)
        return ids, lengths

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def text_shards(docs: "datasets.Dataset", shard_bytes: int = 0) -> Iterator["pa.Array"]:
    """The `text` column in contiguous pieces of about shard_bytes of UTF-8 (at least one document each).

    Reads the Arrow table under the dataset directly (with `take` where the dataset is a selection of its rows,
    e.g. after a filter): datasets' own row iteration gathers such rows one by one, slow for millions of them."""
    import pyarrow.compute as pc

    shard_bytes = shard_bytes or SHARD_BYTES
    column = docs.data.table.column("text")
    lengths = np.asarray(pc.binary_length(column).fill_null(0), np.int64)
    table_ends = np.concatenate([[0], np.cumsum(lengths)])  # bytes before each row of the table
    # the dataset's row selection (filter, select), if any: datasets keeps it as an `indices` table
    rows = None if docs._indices is None else np.asarray(docs._indices.column(0), np.int64)
    ends = np.cumsum(lengths if rows is None else lengths[rows])
    start = 0
    while start < len(ends):
        before = int(ends[start - 1]) if start else 0
        stop = min(len(ends), int(np.searchsorted(ends, before + shard_bytes)) + 1)
        if rows is None:
            yield column.slice(start, stop - start).combine_chunks()
        else:
            yield _take(column, rows[start:stop], table_ends)
        start = stop


def _take(column: "pa.ChunkedArray", rows: np.ndarray, table_ends: np.ndarray) -> "pa.Array":
    """column[rows]. Ascending rows close together (a filtered dataset's) are taken from the one contiguous window
    that holds them: `take` on a column of many chunks costs far more than the rows it returns."""
    import pyarrow as pa

    lo, hi = int(rows[0]), int(rows[-1]) + 1
    window_bytes = table_ends[hi] - table_ends[lo]
    if (np.diff(rows) > 0).all() and window_bytes <= 4 * (table_ends[rows + 1] - table_ends[rows]).sum() + 4096:
        return column.slice(lo, hi - lo).combine_chunks().take(pa.array(rows - lo))
    return column.take(pa.array(rows)).combine_chunks()


# --- writing ------------------------------------------------------------------------------------------------------

class RowWriter:
    """Rows into an Arrow stream file (the format `datasets.Dataset.from_file` memory-maps), one record batch per
    `write` (per shard: where batches end depends on the data alone)."""

    def __init__(self, path: Path, pack_len: int):
        import pyarrow as pa

        self.schema = row_features(pack_len).arrow_schema
        self.width = pack_len + 1
        self.rows = 0
        self._sink = pa.ipc.new_stream(str(path), self.schema)

    def write(self, tokens_RL: np.ndarray, segments_RL: np.ndarray) -> None:
        import pyarrow as pa

        if not len(tokens_RL):
            return

        def rows(x_RL):  # zero-copy: the values buffer is the array's own
            return pa.FixedSizeListArray.from_arrays(pa.array(x_RL.reshape(-1), pa.int32()), self.width)

        # a row starts inside the stream, never in padding: its first segment id names its first document
        first_doc = segments_RL[:, 0].astype(np.int64) - 1
        self._sink.write_batch(pa.RecordBatch.from_arrays([rows(tokens_RL), rows(segments_RL), pa.array(first_doc)],
                                                          schema=self.schema))
        self.rows += len(tokens_RL)

    def close(self) -> None:
        self._sink.close()


# --- one split, every split --------------------------------------------------------------------------------------

def pack_split(docs: "datasets.Dataset", encoder: Encoder, path: Path, pack_len: int,
               stop: threading.Event | None = None) -> dict:
    """Tokenize, pack and write one split's documents; {rows, documents, tokens} (tokens: the stream, <eos> in)."""
    packer = StreamPacker(pack_len, encoder.tokenizer.special_id("<pad>"))
    writer = RowWriter(path, pack_len)
    tokens = 0
    try:
        for ids, lengths in encoder.encode(text_shards(docs)):
            if stop is not None and stop.is_set():
                raise BuildStopped()
            tokens += len(ids)
            writer.write(*packer.add(ids, lengths))
        writer.write(*packer.finish())
    finally:
        writer.close()
    return {"rows": writer.rows, "documents": packer.documents, "tokens": tokens}


def build_rows(splits: dict[str, "datasets.Dataset"], tokenizer: Tokenizer, pack_len: int, folder: Path,
               num_proc: int = 0, stop: threading.Event | None = None) -> dict:
    """Write folder/<split>.arrow for each split; {split}_rows, _documents and _tokens for the cache's meta.

    num_proc: tokenizing processes (0: every local core; 1: this process alone). `stop` set from another thread
    ends the build at the next shard with BuildStopped."""
    meta = {}
    (folder / "spill").mkdir()
    encoder = Encoder(tokenizer, num_proc or local_cores(), folder / "spill")
    try:
        with one_thread():
            for split, docs in splits.items():
                counts = pack_split(docs, encoder, folder / f"{split}.arrow", pack_len, stop)
                meta.update({f"{split}_{k}": v for k, v in counts.items()})
    finally:
        encoder.close()
        shutil.rmtree(folder / "spill", ignore_errors=True)
    return meta

"""A streamed hub dataset (`hf:...?streaming=1`): documents read in order, tokenized and cut into windows on the fly.

Why: a corpus larger than the disk can be neither prepared as Arrow files nor cached as packed rows
(data/cache.py), and a random permutation of it cannot be read from the network. So a streamed source is one
token stream, read in order: each document's ids then <eos>, concatenated. Window i of it is the seq_len + 1
tokens from token i * seq_len (consecutive windows share one token, so every token is a target once), with
segment ids counting the documents inside the window, which keeps documents from attending to each other as in
packed rows. The first `data.synthetic_val_rows` windows are the validation split (all a streamed
`data.val_sources` entry gives); training starts at the next document, and when the stream ends it starts there
again (the next epoch). `data.shuffle` does not apply.

Resumable by position: the pipeline's checkpointed state holds, per streamed source, the cursor of its next
training window: datasets' `IterableDataset.state_dict()` (the shard reached and the example within it) taken
before a batch of documents was read, the document within that batch, and the token within that document. A
resumed run loads that state, so datasets reopens the shard it had reached instead of re-reading the stream.

Hosts: sample positions of every host interleave in each batch, so each host reads and tokenizes the whole stream
and keeps the windows of its own rows (correct at any host count, but every host does all the reading; splitting
the stream by host, datasets.distributed.split_dataset_by_node, would change the order with the host count).
"""
from __future__ import annotations

import collections
import copy
import threading
from collections.abc import Callable

import numpy as np

from data import hub
from data.cache import log
from data.config import DataConfig, SourceConfig
from data.objectives import Windows
from data.tokenize import Tokenizer
from parallel.errors import UserError

DOCS_PER_READ = 256  # documents tokenized together (one IterableDataset state per batch)
KEEP_WINDOWS_TOKENS = 1 << 22  # windows kept behind the latest request (hosts ask out of order), in tokens
KEEP_CURSORS = 1 << 16  # recent windows whose cursor a checkpoint can still ask for


class _Reader:
    """Consecutive windows of the token stream from a cursor on: documents tokenized DOCS_PER_READ at a time."""

    def __init__(self, open_ds: Callable, field: str, key: str, path: str, tokenizer: Tokenizer, length: int):
        self.open_ds, self.field, self.key, self.path = open_ds, field, key, path
        self.tokenizer, self.length = tokenizer, length
        self.eos = tokenizer.special_id("<eos>")
        self.docs: collections.deque = collections.deque()  # (ids with <eos>, cursor of its first token)
        self.head = 0  # tokens of docs[0] already behind the next window's start
        self.buffered = 0  # tokens in docs, from docs[0]'s first
        self.ended = False

    def open(self, cursor: dict) -> None:
        """Continue at a cursor: {"epoch", "state": the dataset's state before a read (None: its start), "doc":
        documents of that read to skip, "token": tokens of the next one to skip}."""
        ds = self.open_ds()
        if cursor["state"] is not None:
            ds.load_state_dict(copy.deepcopy(cursor["state"]))
        self.ds, self.it, self.epoch = ds, iter(ds), cursor["epoch"]
        self.docs.clear()
        self.head, self.buffered, self.ended = 0, 0, False
        self._read(skip_docs=cursor["doc"])  # the read that cursor's state began, without its first documents
        self._advance(cursor["token"])

    def _read(self, skip_docs: int = 0) -> None:
        state = self.ds.state_dict()
        texts = []
        for _ in range(DOCS_PER_READ):
            try:
                row = next(self.it)
            except StopIteration:
                self.ended = True
                break
            if self.field not in row:
                raise UserError(f"{self.key}.text_field: {self.path} has no column {self.field!r}; its columns: "
                                f"{', '.join(row)}")
            text = row[self.field]
            if not isinstance(text, str):
                raise UserError(f"{self.key}.text_field: column {self.field!r} of {self.path} holds "
                                f"{type(text).__name__}, not text; name the text column")
            texts.append(text)
        for k, ids in enumerate(self.tokenizer.encode_batch(texts[skip_docs:]), start=skip_docs):
            if len(ids):  # empty documents are skipped, as in the other sources
                doc = np.append(np.asarray(ids, np.int32), np.int32(self.eos))
                self.docs.append((doc, {"epoch": self.epoch, "state": state, "doc": k}))
                self.buffered += len(doc)

    def _advance(self, n: int) -> None:
        self.head += n
        while self.docs and self.head >= len(self.docs[0][0]):
            self.head -= len(self.docs[0][0])
            self.buffered -= len(self.docs.popleft()[0])

    def cursor(self) -> dict:
        """Where the next window starts."""
        if not self.docs:
            self._fill(1)
        return {**self.docs[0][1], "token": self.head} if self.docs else {"epoch": self.epoch, "state":
                                                                          self.ds.state_dict(), "doc": 0, "token": 0}

    def _fill(self, tokens: int) -> bool:
        """At least `tokens` tokens ahead of the next window's start; False when the stream ended first."""
        while self.buffered - self.head < tokens and not self.ended:
            self._read()
        return self.buffered - self.head >= tokens

    def window(self) -> tuple[np.ndarray, np.ndarray, dict] | None:
        """(tokens, segment ids, cursor) of the next window, advancing one window (None: the stream has ended)."""
        n = self.length + 1
        if not self._fill(n):
            return None
        cursor = self.cursor()
        tokens, segments, at, pos, d = [], [], 0, self.head, 0
        while at < n:
            doc = self.docs[d][0]
            piece = doc[pos:pos + n - at]
            tokens.append(piece)
            segments.append(np.full(len(piece), d + 1, np.int32))
            at, pos, d = at + len(piece), 0, d + 1
        self._advance(self.length)
        return np.concatenate(tokens), np.concatenate(segments), cursor


class StreamSource:
    """A streamed hub source in the packed pipeline: window i of training is the i-th after the validation ones."""

    def __init__(self, key: str, src: SourceConfig, cfg: DataConfig, tokenizer: Tokenizer, seq_len: int):
        if cfg.objective == "sft":
            raise UserError(f"{key}.path: {src.path} is streamed; sft examples are read whole: drop ?streaming=1")
        self.key, self.path, self.weight, self.seq_len = key, src.path, src.weight, seq_len
        self.n_train, self.n_val = None, cfg.synthetic_val_rows  # training: endless, in order
        if self.n_val < 1:
            raise UserError(f"data.synthetic_val_rows: a streamed source holds out that many windows for "
                            f"validation; give at least 1 (got {self.n_val})")
        self.meta = {"settings": {"stream": hub.fingerprint(key, src.path), "text_field": src.text_field,
                                  "seq_len": seq_len, "val_windows": self.n_val}}
        self.reader = _Reader(lambda: hub.open_stream(key, src.path), src.text_field, key, src.path, tokenizer,
                              seq_len)
        self.lock = threading.Lock()  # the prefetch thread and the caller (checkpoints, jumps) share the reader
        self.reader.open({"epoch": 0, "state": None, "doc": 0, "token": 0})
        val = [self.reader.window() for _ in range(self.n_val)]
        if val[-1] is None:
            raise UserError(f"{key}.path: {src.path} has fewer than {self.n_val + 1} windows of train.seq_len "
                            f"{seq_len} tokens; lower data.synthetic_val_rows or train.seq_len, or stream a larger "
                            "split")
        self.val_tokens = np.stack([w[0] for w in val])
        self.val_segments = np.stack([w[1] for w in val])
        # training starts at the first document after the validation windows
        while self.reader.docs and self.reader.head:
            self.reader._advance(len(self.reader.docs[0][0]) - self.reader.head)
        self.start = self.reader.cursor()
        if not self.reader._fill(seq_len + 1) and not key.startswith("data.val_sources"):  # (those validate only)
            raise UserError(f"{key}.path: {src.path} has no training windows after the {self.n_val} validation "
                            "ones; lower data.synthetic_val_rows or train.seq_len")
        self.next = 0  # index of the reader's next training window
        self.recent: collections.OrderedDict = collections.OrderedDict()  # index -> (tokens, segments)
        self.cursors: collections.OrderedDict = collections.OrderedDict()  # index -> cursor

    # --- reading ---

    def _produce(self, keep_from: int) -> None:
        """Read the next training window; kept windows before `keep_from` may go when over KEEP_WINDOWS_TOKENS."""
        w = self.reader.window()
        if w is None:  # the end of the stream: the next epoch starts again after the validation windows
            self.reader.open({**self.start, "epoch": self.reader.epoch + 1})
            w = self.reader.window()
        tokens, segments, cursor = w
        self.recent[self.next], self.cursors[self.next] = (tokens, segments), cursor
        while len(self.recent) * (self.seq_len + 1) > KEEP_WINDOWS_TOKENS and next(iter(self.recent)) < keep_from:
            self.recent.popitem(last=False)
        while len(self.cursors) > KEEP_CURSORS:
            self.cursors.popitem(last=False)
        self.next += 1

    def _seek_locked(self, index: int, cursor: dict | None) -> None:
        if cursor is None:  # no saved cursor: read from the start of training up to the window (slow)
            log(f"{self.key}: no stream position saved for window {index} of {self.path}; reading up to it")
            self.reader.open(self.start)
            self.next = 0
            self.recent.clear()
            self.cursors.clear()
            while self.next < index:
                self._produce(keep_from=index)
            return
        self.reader.open(cursor)
        self.next = index
        self.recent.clear()
        self.cursors.clear()

    def train_windows(self, index: np.ndarray) -> Windows:
        index = np.asarray(index, np.int64)
        with self.lock:
            if len(index) and int(index.min()) not in self.recent and int(index.min()) < self.next:
                i = int(index.min())  # behind what is kept (a jump back): reopen at its cursor if known
                self._seek_locked(i, self.cursors.get(i))
            while self.next <= int(index.max(initial=-1)):
                self._produce(keep_from=int(index.min()))
            rows = [self.recent[int(i)] for i in index]
        n = self.seq_len + 1
        tokens = np.stack([r[0] for r in rows]) if rows else np.zeros((0, n), np.int32)
        segments = np.stack([r[1] for r in rows]) if rows else np.zeros((0, n), np.int32)
        return Windows(tokens, segments, np.ones(tokens.shape, bool))

    def val_windows(self, index: np.ndarray) -> Windows:
        index = np.asarray(index, np.int64)
        tokens = self.val_tokens[index]
        return Windows(tokens, self.val_segments[index], np.ones(tokens.shape, bool))

    # --- position ---

    def cursor_at(self, index: int) -> dict:
        """The JSON-able cursor of training window `index` (read up to it if needed), for a checkpoint."""
        with self.lock:
            while self.next <= index:
                self._produce(keep_from=index)
            cursor = self.cursors.get(index)
        if cursor is None:
            return {"window": index}  # older than the kept cursors: a resume reads up to it
        return {"window": index, **cursor}

    def seek(self, saved: dict | None, index: int) -> None:
        """Continue at training window `index` (a checkpoint's cursor for it, if it has one)."""
        cursor = saved if saved and saved.get("window") == index and "state" in saved else None
        with self.lock:
            self._seek_locked(index, None if cursor is None else {k: cursor[k] for k in ("epoch", "state", "doc",
                                                                                        "token")})


def samples_before(schedule, position: int, k: int) -> int:
    """How many of the positions before `position` the mixture schedule gives source k (its next index there)."""
    if len(schedule.counts) == 1:
        return int(position)
    block, _ = divmod(int(position), schedule.block)
    start = block * schedule.block
    source, _ = schedule.locate(np.arange(start, int(position), dtype=np.int64))
    return int(block * schedule.counts[k] + np.count_nonzero(source == k))

"""The `sft` objective's source: tokenized examples packed several to a row, loss on response tokens only.

Each row holds whole examples (never one split across rows) of at most seq_len + 1 tokens, each with its own
segment id, so document masking and per-document positions (data/objectives.py causal()) keep packed examples
from attending to each other. Packing is best fit in example order (deterministic, O(n log n)); an example
longer than a row is cut to the row (counted, one warning). The causal objective turns the loss mask into
weights: a target weighs 1 where it is a response token of the same example, so the loss, divided by the sum of
weights, is the mean over response tokens. Train rows are read in a fresh permutation each epoch, like the
corpus sources, so the stream is a pure function of the sample position (deterministic and resumable).
"""
from __future__ import annotations

import bisect

import numpy as np

from data.cache import cache_root, log
from data.config import DataConfig, SourceConfig
from data.loader import permute
from data.objectives import Windows
from data.sft_examples import Examples, n_val_examples, sft_examples
from data.tokenize import Tokenizer


def pack_examples(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row of each example, its start in the row, number of rows): best fit, in example order.

    Each example goes to the row with the least room that still holds it (the lowest such row on ties), or
    opens a new row; lengths over row_len count as row_len (the caller cuts them)."""
    lengths = np.minimum(np.asarray(lengths, np.int64), row_len)
    row, start = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    room: list[tuple[int, int]] = []  # (free tokens, row) of rows with room left, sorted
    used: list[int] = []
    for e, n in enumerate(lengths.tolist()):
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            _, r = room.pop(k)
        else:
            r = len(used)
            used.append(0)
        row[e], start[e] = r, used[r]
        used[r] += n
        if used[r] < row_len:
            bisect.insort(room, (row_len - used[r], r))
    return row, start, len(used)


class PackedExamples:
    """One split's examples packed into rows of row_len tokens; rows are assembled when asked for."""

    def __init__(self, examples: Examples, row_len: int, pad: int):
        self.examples, self.row_len, self.pad = examples, row_len, pad
        lengths = examples.lengths()
        self.n_cut = int((lengths > row_len).sum())
        row, start, self.n_rows = pack_examples(lengths, row_len)
        order = np.lexsort((start, row))  # examples of each row, left to right
        self.example_of = order
        self.row_starts = np.searchsorted(row[order], np.arange(self.n_rows + 1))
        self.start_of = start

    def rows(self, index: np.ndarray) -> Windows:
        shape = (len(index), self.row_len)
        tokens, segments, loss = np.full(shape, self.pad, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool)
        off = self.examples.offsets
        for i, r in enumerate(np.asarray(index, np.int64)):
            for j, e in enumerate(self.example_of[self.row_starts[r]:self.row_starts[r + 1]]):
                a = self.start_of[e]
                n = min(int(off[e + 1] - off[e]), self.row_len - a)
                tokens[i, a:a + n] = self.examples.tokens[off[e]:off[e] + n]
                loss[i, a:a + n] = self.examples.loss[off[e]:off[e] + n]
                segments[i, a:a + n] = j + 1
        return Windows(tokens, segments, loss)


class SFTSource:
    """A JSONL/Parquet (or generator) source of sft examples; the last val_fraction of them is the validation split."""

    def __init__(self, key: str, src: SourceConfig, index: int, cfg: DataConfig, tokenizer: Tokenizer,
                 seq_len: int, seed: int):
        examples, self.meta = sft_examples(key, src, cfg, tokenizer, cache_root(cfg))
        n = len(examples)
        n_val = n_val_examples(n, cfg.val_fraction)
        pad = tokenizer.special_id("<pad>")
        self.train = PackedExamples(examples.take(0, n - n_val), seq_len + 1, pad)
        self.val = PackedExamples(examples.take(n - n_val, n), seq_len + 1, pad)
        self.key, self.path, self.weight, self.seq_len = key, src.path, src.weight, seq_len
        self.n_train, self.n_val = self.train.n_rows, self.val.n_rows
        self.shuffle, self.seed, self.index = cfg.shuffle, seed, index
        cut = self.train.n_cut + self.val.n_cut
        if cut:
            log(f"{cut} of {n} sft examples of {src.path} are longer than a row (train.seq_len + 1 = {seq_len + 1} "
                "tokens) and were cut; raise train.seq_len to keep them whole")

    def train_windows(self, index: np.ndarray) -> Windows:
        """The index-th row of this source's endless stream: epoch index // n, a fresh permutation per epoch."""
        epoch, q = np.divmod(np.asarray(index, np.int64), self.n_train)
        if self.shuffle:
            for e in np.unique(epoch):
                at = epoch == e
                q[at] = permute(q[at], self.n_train, self.seed, self.index, int(e))
        return self.train.rows(q)

    def val_windows(self, index: np.ndarray) -> Windows:
        return self.val.rows(index)

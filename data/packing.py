"""Packing documents into fixed-length rows, with segment ids so attention never crosses documents.

Documents (each ending in an end-of-document token) are concatenated into one stream and cut into rows of
`pack_len + 1` tokens that overlap by one token: row r holds stream[r * pack_len : (r + 1) * pack_len + 1], so a
causal objective predicts every stream token exactly once. `segment_ids` number the documents inside a row
(0 marks padding); positions restart at 0 where a document starts and at the start of every row, so a
document's tokens see the same positions and the same context however it is packed.

A source's documents are packed as one stream (StreamPacker): they arrive in pieces (the shards the cache build
tokenizes in parallel), but rows are cut from the whole stream, so only the very last row of a split is padded and
the rows do not depend on where the pieces were cut. Segment ids count documents from the start of that stream.
"""
from __future__ import annotations

import numpy as np


def pack_documents(docs: list[np.ndarray], pack_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids), both (rows, pack_len + 1) int32; the last row is padded with pad_id / segment 0."""
    if not docs:
        return np.zeros((0, pack_len + 1), np.int32), np.zeros((0, pack_len + 1), np.int32)
    packer = StreamPacker(pack_len, pad_id)
    lengths = np.array([len(d) for d in docs], np.int64)
    full, last = packer.add(np.concatenate(docs), lengths), packer.finish()
    return np.concatenate([full[0], last[0]]), np.concatenate([full[1], last[1]])


class StreamPacker:
    """Cuts a stream of documents, given piece by piece, into rows of pack_len + 1 tokens overlapping by one.

    `add` returns the rows the stream so far completes and keeps the rest (fewer than pack_len + 1 tokens) for the
    next piece; `finish` pads that rest into the last row. Document i of the stream (from 0) has segment id i + 1.
    """

    def __init__(self, pack_len: int, pad_id: int):
        self.pack_len, self.pad_id = pack_len, pad_id
        self.documents = 0  # documents seen so far
        self.rows = 0  # rows returned so far
        self._tokens = np.zeros(0, np.int32)  # the stream from the next row's first token on
        self._segments = np.zeros(0, np.int32)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids: the piece's documents back to back (each with its end-of-document token), lengths: theirs.
        Returns the (tokens, segment_ids) rows, both (R, pack_len + 1) int32, that are complete now."""
        ids, lengths = np.ascontiguousarray(ids), np.asarray(lengths, np.int64)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"{len(ids)} ids but the lengths add up to {int(lengths.sum())}")
        first = self.documents + 1
        segments = np.repeat(np.arange(first, first + len(lengths), dtype=np.int32), lengths)
        self.documents += len(lengths)
        carry, L = len(self._tokens), self.pack_len
        n_rows = max(0, (carry + len(ids) - 1) // L)  # row r needs stream[r * L : r * L + L + 1]
        tokens_RL = self._rows(self._tokens, ids, n_rows)
        segments_RL = self._rows(self._segments, segments, n_rows)
        cut = n_rows * L - carry  # the piece from here on starts the next row (the last row's final token too)
        if n_rows:
            self._tokens, self._segments = ids[cut:].astype(np.int32), segments[cut:].copy()
        else:
            self._tokens = np.concatenate([self._tokens, np.asarray(ids, np.int32)])
            self._segments = np.concatenate([self._segments, segments])
        self.rows += n_rows
        return tokens_RL, segments_RL

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The last row, padded with pad_id / segment 0: none when the stream ended exactly at a row's end."""
        rest = len(self._tokens)
        if rest <= 1 and (self.rows or not rest):  # its one token already ends the previous row
            return np.zeros((0, self.pack_len + 1), np.int32), np.zeros((0, self.pack_len + 1), np.int32)
        tokens = np.full((1, self.pack_len + 1), self.pad_id, np.int32)
        segments = np.zeros((1, self.pack_len + 1), np.int32)
        tokens[0, :rest], segments[0, :rest] = self._tokens, self._segments
        self._tokens, self._segments = self._tokens[:0], self._segments[:0]
        self.rows += 1
        return tokens, segments

    def _rows(self, carry: np.ndarray, piece: np.ndarray, n_rows: int) -> np.ndarray:
        """Rows 0..n_rows-1 of carry + piece, copied once out of the piece (carry: shorter than a row)."""
        L = self.pack_len
        out_RL = np.empty((n_rows, L + 1), np.int32)
        if not n_rows:
            return out_RL
        head = len(carry)
        if head:  # only the first row reaches back into the carry
            out_RL[0, :head], out_RL[0, head:] = carry, piece[:L + 1 - head]
        first = 1 if head else 0
        start = first * L - head
        view = np.lib.stride_tricks.as_strided(piece[start:], (n_rows - first, L + 1),
                                               (L * piece.itemsize, piece.itemsize), writeable=False)
        out_RL[first:] = view  # (converting uint16 ids to int32 on the way)
        return out_RL


def positions_from_segments(segment_ids_NL: np.ndarray) -> np.ndarray:
    """Position of each token inside its document, restarting at every segment change and at each row start."""
    n, length = segment_ids_NL.shape
    t_L = np.arange(length, dtype=np.int32)
    starts_NL = np.ones((n, length), bool)
    starts_NL[:, 1:] = segment_ids_NL[:, 1:] != segment_ids_NL[:, :-1]
    last_start_NL = np.maximum.accumulate(np.where(starts_NL, t_L, 0), axis=1)
    return (t_L - last_start_NL).astype(np.int32)

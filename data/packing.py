"""Packing documents into fixed-length rows, with segment ids so attention never crosses documents.

Documents (each ending in an end-of-document token) are concatenated into one stream and cut into rows of
`pack_len + 1` tokens that overlap by one token: row r holds stream[r * pack_len : (r + 1) * pack_len + 1], so a
causal objective predicts every stream token exactly once. `segment_ids` number the documents inside a row
(0 marks padding); positions restart at 0 where a document starts and at the start of every row, so a
document's tokens see the same positions and the same context however it is packed.
"""
from __future__ import annotations

import numpy as np


def pack_documents(docs: list[np.ndarray], pack_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids), both (rows, pack_len + 1) int32; the last row is padded with pad_id / segment 0."""
    if not docs:
        return np.zeros((0, pack_len + 1), np.int32), np.zeros((0, pack_len + 1), np.int32)
    lengths = np.array([len(d) for d in docs])
    stream = np.concatenate(docs).astype(np.int32)
    seg_stream = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), lengths)
    n_rows = max(1, -(-(len(stream) - 1) // pack_len))
    padded_len = n_rows * pack_len + 1
    tokens = np.full(padded_len, pad_id, np.int32)
    segs = np.zeros(padded_len, np.int32)
    tokens[: len(stream)], segs[: len(stream)] = stream, seg_stream
    index_RL = np.arange(n_rows)[:, None] * pack_len + np.arange(pack_len + 1)
    return tokens[index_RL], segs[index_RL]


def positions_from_segments(segment_ids_NL: np.ndarray) -> np.ndarray:
    """Position of each token inside its document, restarting at every segment change and at each row start."""
    n, length = segment_ids_NL.shape
    t_L = np.arange(length, dtype=np.int32)
    starts_NL = np.ones((n, length), bool)
    starts_NL[:, 1:] = segment_ids_NL[:, 1:] != segment_ids_NL[:, :-1]
    last_start_NL = np.maximum.accumulate(np.where(starts_NL, t_L, 0), axis=1)
    return (t_L - last_start_NL).astype(np.int32)

"""Deterministic, resumable, per-host sharded batches.

The batch for step s is a pure function of (seed, s): resuming at step N costs nothing, and every host derives
the same global batch plan but reads and transfers only the rows its own devices hold. Global `jax.Array`s are
assembled from those local rows with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from parallel.errors import UserError

Batch = dict[str, np.ndarray]


def process_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
    """Global batch rows held by this process's devices, in the order make_array_from_process_local_data wants."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(*index[0].indices(global_batch)))
    return np.array(sorted(rows), dtype=np.int64)


def to_global(host_batch: Batch, sharding: NamedSharding, global_batch: int) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
        for k, v in host_batch.items()
    }


class WindowLoader:
    """Random windows of seq_len + 1 tokens from one token stream (the next-token objective on plain text)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise UserError(f"train.seq_len: {seq_len} is longer than the training split ({len(tokens)} tokens); "
                            "use a shorter sequence or a larger corpus")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)

    def host_batch(self, step: int, rows: np.ndarray) -> Batch:
        starts = self.offsets(step)[rows]
        window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return {
            "inputs": window[:, :-1],
            "targets": window[:, 1:],
            "weights": np.ones((len(rows), self.seq_len), np.float32),
        }


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, rows: np.ndarray,
                 max_batches: int = 0) -> Iterator[Batch]:
    """Consecutive, non-overlapping windows covering the whole split, so every token is predicted exactly once.

    The last window and the last batch are padded with zero-weight positions; max_batches > 0 stops early.
    """
    n_targets = len(tokens) - 1
    n_windows = -(-n_targets // seq_len)
    n_batches = -(-n_windows // batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    padded = np.zeros(n_windows * seq_len + 1, np.int32)
    padded[: len(tokens)] = tokens
    valid = np.zeros(n_windows * seq_len, np.float32)
    valid[:n_targets] = 1.0
    for b in range(n_batches):
        w = b * batch_size + rows  # window index of each of this host's rows
        live = w < n_windows
        w = np.where(live, w, 0)
        pos = w[:, None] * seq_len + np.arange(seq_len)
        yield {
            "inputs": padded[pos],
            "targets": padded[pos + 1],
            "weights": valid[pos] * live[:, None],
        }

"""Deterministic, resumable, per-host sharded batches.

The batch for step s is a pure function of (seed, its sample positions s x batch size + row, counted from the
last restore): resuming at step N costs nothing, even at another batch size, and every host derives
the same global batch plan but reads and transfers only the rows its own devices hold. Global `jax.Array`s are
assembled from those local rows with `jax.make_array_from_process_local_data`.

For packed data the global order is: sample position p -> (source, index) by a seeded weighted schedule
(`MixtureSchedule`), then index -> row by a permutation of the source's rows that is fresh each epoch and can be
evaluated at any index (`permute`, a Feistel cipher), so no epoch's order is ever materialised or replayed.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import NamedSharding

from data.hashing import hash64, mix64
from data.validation import spread
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
    """Random windows of seq_len + 1 tokens from one token stream (the next-token objective on plain text).

    Sample position p (step x batch size + row, counted from the last restore) starts at a window drawn from
    (seed, p) alone, as in the packed pipeline: a resume at another batch size reads on from the samples drawn.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise UserError(f"train.seq_len: {seq_len} is longer than the training split ({len(tokens)} tokens); "
                            "use a shorter sequence or a larger corpus")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.base_step, self.base_position = 0, 0

    def position(self, step: int) -> int:
        return self.base_position + (step - self.base_step) * self.batch_size

    def offsets_at(self, positions: np.ndarray) -> np.ndarray:
        """Window starts of these sample positions (the modulo's bias is below n / 2^64: none measurable)."""
        n = np.uint64(len(self.tokens) - self.seq_len - 1)
        return (hash64(self.seed, np.asarray(positions, np.int64)) % n).astype(np.int64)

    def state(self, step: int) -> dict:
        return {"step": step, "position": self.position(step), "batch_size": self.batch_size}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state; an older one without a position resumes at step x batch size."""
        if state and "position" in state:
            self.base_step, self.base_position = int(state["step"]), int(state["position"])

    def host_batch(self, step: int, rows: np.ndarray) -> Batch:
        starts = self.offsets_at(self.position(step) + np.asarray(rows, np.int64))
        window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return {
            "inputs": window[:, :-1],
            "targets": window[:, 1:],
            "weights": np.ones((len(rows), self.seq_len), np.float32),
        }


def eval_plan(total: int, batch_size: int, rows: np.ndarray,
              max_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(index, live) of this host's rows in each eval batch over items 0..total-1 taken in order, batch_size a
    batch: rows past the end have index 0 and live False. max_batches > 0 stops early."""
    n_batches = -(-total // batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    rows = np.asarray(rows, np.int64)
    for b in range(n_batches):
        g = b * batch_size + rows
        live = g < total
        yield np.where(live, g, 0), live


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, rows: np.ndarray,
                 max_batches: int = 0, max_windows: int = 0) -> Iterator[Batch]:
    """Consecutive, non-overlapping windows covering the whole split, so every token is predicted exactly once.

    The last window and the last batch are padded with zero-weight positions; max_batches > 0 stops early;
    max_windows > 0 reads only that many windows, evenly spread over the split (data/validation.py).
    """
    n_targets = len(tokens) - 1
    n_windows = -(-n_targets // seq_len)
    padded = np.zeros(n_windows * seq_len + 1, np.int32)
    padded[: len(tokens)] = tokens
    valid = np.zeros(n_windows * seq_len, np.float32)
    valid[:n_targets] = 1.0
    chosen = spread(n_windows, max_windows or n_windows)
    for i, live in eval_plan(len(chosen), batch_size, rows, max_batches):
        pos = chosen[i][:, None] * seq_len + np.arange(seq_len)
        yield {
            "inputs": padded[pos],
            "targets": padded[pos + 1],
            "weights": valid[pos] * live[:, None],
        }


# --- packed data: order ----------------------------------------------------------------------------------------

FEISTEL_ROUNDS = 6


@functools.lru_cache(maxsize=256)
def _round_keys(key: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    return tuple(hash64(*key, r) for r in range(FEISTEL_ROUNDS))


def permute(index: np.ndarray, n: int, *key: int) -> np.ndarray:
    """The key's pseudo-random permutation of range(n), evaluated at `index` only: O(len(index)) for any n.

    A balanced Feistel network is a bijection on [0, 4^h) >= n; cycle-walking (re-encrypting values >= n) turns
    it into a bijection on [0, n). The domain is < 4n, so a value needs fewer than 4 rounds of walking on average.
    """
    index = np.asarray(index, np.int64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = _round_keys(tuple(int(k) for k in key))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in round_keys:
            left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = encrypt(index.astype(np.uint64))
    walk = out >= n
    while walk.any():
        out[walk] = encrypt(out[walk])
        walk = out >= n
    return out.astype(np.int64)


class MixtureSchedule:
    """Which source each sample position reads, and the how-many-th sample of that source it is.

    Positions come in blocks of `block` samples; in each block source k fills round(w_k * block) slots (at least
    one) in a seeded random order. So the mixture holds the weights exactly per block, and a source's sample
    count at any position is closed-form: block * count_k + its rank inside the block (O(1) to resume).
    """

    def __init__(self, weights: list[float], seed: int, block: int = 4096):
        w = np.asarray(weights, np.float64) / np.sum(weights)
        counts = np.maximum(1, np.floor(w * block).astype(np.int64))
        for k in np.argsort(-(w * block - np.floor(w * block)))[: max(0, block - counts.sum())]:
            counts[k] += 1  # largest remainders take the slots rounding left over
        self.counts, self.block, self.seed = counts, int(counts.sum()), seed
        self._layout = functools.lru_cache(maxsize=8)(self._block_layout)  # this schedule's last 8 blocks

    def _block_layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, its rank among the source's slots) in block b."""
        source = np.random.default_rng([self.seed, 0x5EED, b]).permutation(np.repeat(np.arange(len(self.counts)),
                                                                                    self.counts))
        rank = np.empty(self.block, np.int64)
        for k in range(len(self.counts)):
            at = np.flatnonzero(source == k)
            rank[at] = np.arange(len(at))
        return source, rank

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source's sample stream) of each position."""
        positions = np.asarray(positions, np.int64)
        if len(self.counts) == 1:
            return np.zeros_like(positions), positions
        source, index = np.empty_like(positions), np.empty_like(positions)
        blocks = positions // self.block
        for b in np.unique(blocks):
            at = blocks == b
            src, rank = self._layout(int(b))
            offset = positions[at] - b * self.block
            source[at] = src[offset]
            index[at] = b * self.counts[src[offset]] + rank[offset]
        return source, index


class Prefetcher:
    """Computes `make(step)` for the next `depth` steps in a background thread while the caller trains.

    Batches are pure functions of the step, so a prefetched batch is exactly the batch the caller would have
    built; asking for any other step (a resume, a jump) just computes it directly.
    """

    def __init__(self, make: Callable[[int], dict], depth: int):
        self.make, self.depth = make, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshforge-prefetch") if depth else None
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> dict:
        future = self.pending.pop(step, None)
        batch = future.result() if future is not None else self.make(step)
        if self.pool is not None:
            for s in [s for s in self.pending if s < step or s > step + self.depth]:
                self.pending.pop(s).cancel()
            for s in range(step + 1, step + 1 + self.depth):
                if s not in self.pending:
                    self.pending[s] = self.pool.submit(self.make, s)
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()

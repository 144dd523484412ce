"""Which validation windows an evaluation reads: the same on every process and at every evaluation.

The validation sources' windows are laid end to end (source 0's, then source 1's, ...), and an evaluation reads
them in that order, batch after batch. `data.val_max_tokens` caps the count: a budget of val_max_tokens //
train.seq_len windows is shared by the sources in proportion to their number of windows (at least one each, so
every source keeps its val_loss_<name>), and a source's share is spread evenly over its windows (the
floor(i * n / m)-th of n, i < m) rather than taken from its start. A corpus stored in some order (by date,
topic, length) is then still judged on all of its held-out part, and the overall val_loss keeps estimating the
same token-weighted mean as the uncapped one. The plan is a function of the sizes and the cap alone.

A capped window keeps its uncapped place (`position`): the objective keys its random choices (masking, span
corruption) by it, so a window reads the same under any cap.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def capped_counts(sizes: Sequence[int], max_windows: int) -> np.ndarray:
    """How many windows of each source an evaluation reads: all of them (max_windows 0 or enough), else
    floor(max_windows * n_k / sum n), at least 1 for a source that has any."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if max_windows <= 0 or total <= max_windows:
        return sizes
    share = (sizes * max_windows) // total  # exact integer arithmetic: no float rounding differs between hosts
    return np.minimum(sizes, np.maximum(share, (sizes > 0).astype(np.int64)))


def spread(n: int, m: int) -> np.ndarray:
    """m of the indices 0..n-1, evenly spaced from the first (all of them when m >= n)."""
    if m >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(m, dtype=np.int64) * n) // m


def max_windows(max_tokens: int, seq_len: int) -> int:
    """The window budget of a token cap (0: no cap); a cap below one window still reads one."""
    return max(1, max_tokens // seq_len) if max_tokens > 0 else 0


class ValPlan:
    """The windows one evaluation reads, as items 0..total-1: each one's source, its index among that source's
    validation windows, and its position in the uncapped sequence."""

    def __init__(self, sizes: Sequence[int], max_windows: int = 0):
        sizes = np.asarray(sizes, np.int64)
        counts = capped_counts(sizes, max_windows)
        self.index = [spread(int(n), int(m)) for n, m in zip(sizes, counts)]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # uncapped
        self.total = int(self.starts[-1])

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, window index within the source, uncapped position) of each item (items < total)."""
        items = np.asarray(items, np.int64)
        source = np.searchsorted(self.starts, items, side="right") - 1
        index = np.empty_like(items)
        for k in np.unique(source):
            at = source == k
            index[at] = self.index[k][items[at] - self.starts[k]]
        return source, index, self.offsets[source] + index

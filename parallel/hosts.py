"""Decisions every process of a multi-host run must take together. Each is a no-op with one process.

A host that decides alone (to stop, to skip a checkpoint, to give up) leaves the others waiting in a collective
it will never join, until the coordination service kills them all minutes later.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from parallel.errors import UserError


def processes_where(flag: bool) -> list[int]:
    """Indices of the processes on which the flag is set (all processes call this at the same point)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([flag]))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def any_process(flag: bool) -> bool:
    """True if the flag is set on any process."""
    return bool(processes_where(flag))


def agree(check: Callable[[], None] | None, elsewhere: str) -> None:
    """Run a check that may raise UserError (None: nothing to check on this host); if it failed on any host,
    every host raises, each with one line."""
    problem = None
    if check is not None:
        try:
            check()
        except UserError as e:
            problem = e
    if any_process(problem is not None):
        raise problem or UserError(elsewhere)


def gather(x: jax.Array) -> np.ndarray:
    """The whole of a batch-sharded global array on every host (each host holds only its rows)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
    """Wait until every process reaches this point."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"meshforge-{name}")

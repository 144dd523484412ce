"""Decisions every process of a multi-host run must take together. Each is a no-op with one process.

A host that decides alone (to stop, to skip a checkpoint, to give up) leaves the others waiting in a collective
it will never join, until the coordination service kills them all minutes later.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


class StepFlags:
    """Per-step decisions every process must take at the same step (stop after SIGTERM, a timed save), carried
    through the train step itself instead of a host round trip.

    With several processes each device holds one row of its host's flags and the step returns their max over all
    devices (a tiny all-reduce beside the step's own collectives); every process reads that value from the same
    step's output, so all stop or save together whichever host was signalled, at no cost on the steps where
    nothing happens. One process has one replicated row, and its max is the row itself.
    """

    NAMES = ("stop", "save")

    def __init__(self, mesh: Mesh):
        if jax.process_count() == 1:
            # One host, one decision: a replicated row needs no all-reduce, which would be a point where every
            # device waits for the slowest in the middle of each step.
            self.sharding, self.shape = NamedSharding(mesh, PartitionSpec()), (1, len(self.NAMES))
        else:
            # One row per device, sharded over every mesh axis: no row is replicated, so no two devices can hold
            # different copies of it.
            self.sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
            self.shape = (mesh.size, len(self.NAMES))
        self._arrays: dict[tuple[bool, ...], jax.Array] = {}

    def array(self, **flags: bool) -> jax.Array:
        """The step's flags input with this host's flags set (cached: flags rarely change)."""
        key = tuple(bool(flags.pop(name, False)) for name in self.NAMES)
        if flags:
            raise ValueError(f"unknown step flags {sorted(flags)}; known: {self.NAMES}")
        if key not in self._arrays:
            row_1F = np.array([key], np.int32)
            if self.shape[0] == 1:
                self._arrays[key] = jax.device_put(row_1F, self.sharding)
            else:
                shards = [jax.device_put(row_1F, d) for d in self.sharding.addressable_devices]
                self._arrays[key] = jax.make_array_from_single_device_arrays(self.shape, self.sharding, shards)
        return self._arrays[key]

    def read(self, metrics: dict) -> dict[str, bool]:
        """The agreed flags from a fetched step output."""
        return {name: bool(v) for name, v in zip(self.NAMES, np.asarray(metrics["flags"]))}

"""Refuse a run that cannot fit in memory before anything is allocated or written.

Two checks, both on shapes only: the train state (parameters and optimizer moments, per device, from the
abstract state and its shardings), then the compiled step (XLA's own buffer assignment, compiled from abstract
inputs). Without them a model too big for the host ends in a RESOURCE_EXHAUSTED traceback halfway through
initialisation, or hangs on a buffer whose allocation failed.
"""
from __future__ import annotations

import jax
import numpy as np
import psutil

from parallel.analysis import memory_per_device
from parallel.errors import UserError

KNOBS = ("lower train.batch_size or train.seq_len, raise optim.accum_steps, use model.remat with "
         "model.scan_layers, or shard over more devices")
STATE_KNOBS = ("use a smaller model, optim.moment_dtype bfloat16, or shard over more devices (mesh.fsdp)")


def _budget(per_device: int) -> tuple[int, int | None, str]:
    """(bytes needed, bytes available, where) for a per-device figure on this platform."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":  # every virtual CPU device lives in the one host memory
        return per_device * jax.local_device_count(), psutil.virtual_memory().available, "of host memory"
    return per_device, (device.memory_stats() or {}).get("bytes_limit"), "per device"


def state_bytes_per_device(abstract_state) -> int:
    """Bytes one device holds of a state of ShapeDtypeStructs carrying shardings (shards are even: the
    sharding rules refuse shapes the mesh cannot split evenly)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def check_state_fits(abstract_state) -> None:
    need, have, where = _budget(state_bytes_per_device(abstract_state))
    if have and need > have:
        raise UserError(f"the train state (parameters and optimizer moments) needs {need / 2**30:.1f} GiB {where} "
                        f"but {have / 2**30:.1f} GiB is available; {STATE_KNOBS}")


def check_step_fits(compiled) -> None:
    """Refuse a step that cannot fit in memory, instead of letting the OS kill the run halfway through."""
    peak = memory_per_device(compiled).get("peak")
    if not peak:
        return
    need, have, where = _budget(peak)
    if have and need > have:
        raise UserError(f"the train step needs {need / 2**30:.1f} GiB {where} but {have / 2**30:.1f} GiB is "
                        f"available; {KNOBS}")

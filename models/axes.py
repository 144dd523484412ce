"""Logical-axis helpers shared by the model modules.

Models only *name* axes ('batch', 'embed', ...); which mesh axis a name maps to is decided by the rules table in
parallel/rules.py, installed around model creation and the jitted step with `nnx.logical_axis_rules`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

Axes = tuple[str | None, ...]


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh + rules context."""
    if not spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spmd.get_pspec(PartitionSpec(*axes)))


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes, dtype=jax.numpy.float32) -> nnx.Param:
    """A parameter initialised with `init` and annotated with one logical name per dimension."""
    assert len(axes) == len(shape), (axes, shape)
    # eager_sharding=False keeps models mesh-free: placement comes from the jitted init's out_shardings.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)

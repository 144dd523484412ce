"""Logical-axis helpers shared by the model modules.

Models only *name* axes ('batch', 'embed', ...); which mesh axis a name maps to is decided by the rules table in
parallel/rules.py, installed around model creation and the jitted step with `nnx.logical_axis_rules`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

Axes = tuple[str | None, ...]

# The attention and MLP projection weights by path (blocks/0/attn/wq_DNH, blocks/1/mlp/wo_EFD, ...): what pruning
# and quantization act on by default. Not the embedding (also the tied output head), norms, LoRA adapters or routers.
PROJECTIONS = r"/(wq|wkv|wo|wi)_[A-Z0-9]+$"
# Leading axes that stack independent matrices in one leaf: a scanned model's layers, an MoE block's experts.
STACKED = ("layers", "expert")


def n_stacked(axes: Axes) -> int:
    """How many leading axes of a leaf with these logical names are STACKED (independent matrices)."""
    n = 0
    while n < len(axes) and axes[n] in STACKED:
        n += 1
    return n


def path_name(path) -> str:
    """A pytree key path as the parameter paths meshforge names everywhere: 'blocks/0/attn/wq_DNH'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def contracted_axes(axes: Axes) -> tuple[int, ...]:
    """The axes a projection weight with these logical names contracts: its first after any stacked ones when
    that is the model width ('embed', D -> ...), else all but the last (... -> D, an output projection)."""
    stacked = n_stacked(axes)
    if axes[stacked:stacked + 1] == ("embed",) or len(axes) - stacked < 2:
        return (stacked,)
    return tuple(range(stacked, len(axes) - 1))


def _active() -> bool:
    return bool(spmd.get_logical_axis_rules()) and not jax.sharding.get_abstract_mesh().empty


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh + rules context."""
    if not _active():
        return x
    return jax.lax.with_sharding_constraint(x, spmd.get_pspec(PartitionSpec(*axes)))


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes of size > 1 that a logical name splits over in the current context (() outside one)."""
    if not _active():
        return ()
    mesh = jax.sharding.get_abstract_mesh()
    target = spmd.get_pspec(PartitionSpec(name))[0]
    target = () if target is None else target if isinstance(target, tuple) else (target,)
    return tuple(a for a in target if mesh.shape[a] > 1)


def shards(name: str) -> int:
    """Into how many pieces a logical name splits its dimension in the current context (1 outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in mesh_axes(name))


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes, dtype=jax.numpy.float32) -> nnx.Param:
    """A parameter initialised with `init` and annotated with one logical name per dimension."""
    assert len(axes) == len(shape), (axes, shape)
    # eager_sharding=False keeps models mesh-free: placement comes from the jitted init's out_shardings.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


def embedding_lookup(table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """table_VD[tokens_BT] with the table left sharded: ('vocab', 'embed') in, ('batch', 'length', 'act_embed') out.

    Each device looks its tokens up in the rows and columns it holds, so only tokens and activations move, never
    the (V, D) table. Vocabulary shards: a masked local lookup, then a sum over those shards (each token's row
    lives on exactly one). Model-dimension shards that also split the batch (FSDP): the tokens of the group are
    all-gathered (int32, small), each device fills its columns for all of them, and an all-to-all hands every
    device its own rows with all columns. XLA's own partitioning of this gather either all-gathers the table or,
    on mixed meshes, replicates the result ("involuntary full rematerialization"). Outside a mesh, or where a
    layout does not fit this scheme, it is a plain take.
    """
    vocab, embed, batch = mesh_axes("vocab"), mesh_axes("embed"), mesh_axes("batch")
    to_all = tuple(a for a in embed if a in batch)  # gather tokens, then all-to-all back to the batch layout
    to_gather = tuple(a for a in embed if a not in batch)  # tokens already replicated: all-gather the columns
    fits = (not set(vocab) & set(batch) and not (to_all and to_gather)
            and tokens_BT.shape[0] % shards("batch") == 0)
    if not (vocab or embed) or not fits:
        return jnp.take(table_VD, tokens_BT, axis=0)

    def local(table_vd, tokens_bt):
        if to_all:
            tokens_bt = jax.lax.all_gather(tokens_bt, to_all, axis=0, tiled=True)
        if vocab:
            rows_v = table_vd.shape[0]
            rows_bt = tokens_bt - jax.lax.axis_index(vocab) * rows_v
            mine_bt = (rows_bt >= 0) & (rows_bt < rows_v)
            x_btd = jnp.take(table_vd, jnp.where(mine_bt, rows_bt, 0), axis=0)
            x_btd = jax.lax.psum(jnp.where(mine_bt[..., None], x_btd, 0), vocab)
        else:
            x_btd = jnp.take(table_vd, tokens_bt, axis=0)
        if to_all:
            x_btd = jax.lax.all_to_all(x_btd, to_all, 0, 2, tiled=True)
        if to_gather:
            x_btd = jax.lax.all_gather(x_btd, to_gather, axis=2, tiled=True)
        return x_btd

    batch_spec = PartitionSpec(batch or None)
    return jax.shard_map(local, in_specs=(PartitionSpec(vocab or None, embed or None), batch_spec),
                         out_specs=batch_spec)(table_VD, tokens_BT)

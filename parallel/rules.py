"""The one table from logical axis names (used by models/ and data) to mesh axes.

A single table serves every strategy: an axis of size 1 shards nothing, so data parallel, FSDP, tensor, expert
parallel and their combinations differ only in the mesh shape. tests/test_rules.py fails if the model names an
axis this table lacks, or the table names a mesh axis the mesh lacks.
"""
from __future__ import annotations

# `replica` comes first (outermost: across hosts and slices): the independent model copies of DiLoCo / local SGD /
# federated rounds (train/rounds.py). Plain runs keep it at 1.
MESH_AXES = ("replica", "data", "fsdp", "tensor", "expert")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations. Their feature axes get their own names: an activation's 'embed' must not follow the
    # parameters' 'embed' onto fsdp, or the batch and feature dimensions would both claim the fsdp axis.
    ("batch", ("data", "fsdp", "expert")),  # every non-tensor axis splits the batch
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # MoE dispatch: between dispatch and combine, activations are expert-major. Their expert axis moves onto the
    # expert mesh axis and their group (sequence) axis keeps only the other batch axes; the change of layout
    # from ('batch', ...) is the all-to-all of expert parallelism.
    ("act_expert", "expert"),
    ("expert_group", ("data", "fsdp")),
    # parameters: FSDP shards the model dimension, tensor parallelism the wide dimensions (Megatron layout)
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),  # the stacked-layer axis that nnx.scan adds
    ("lora", None),  # a LoRA adapter's rank: small, replicated; its other axes shard like the weight it adapts
)

LOGICAL_AXES = frozenset(name for name, _ in RULES)


def activate(mesh):
    """Context for tracing sharded code: the mesh plus this table (models' `constrain` needs both)."""
    import contextlib

    import jax
    from flax.core import spmd

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(spmd.logical_axis_rules(RULES))
    return stack

"""The rules table covers every logical name the model uses, and names only mesh axes that exist."""
import dataclasses

import jax
import pytest

from helpers import TINY, mesh_for
from parallel.rules import LOGICAL_AXES, MESH_AXES, RULES
from train.state import model_def

VARIANTS = {
    "default": {},
    "learned+untied+bias+swiglu": dict(positions="learned", tie_embeddings=False, use_bias=True, mlp="swiglu"),
    "gqa+scan": dict(n_kv_heads=2, scan_layers=True),
    "layernorm": dict(norm="layernorm"),
    "moe": dict(moe_experts=4),
    "moe every 2 + scan": dict(moe_experts=4, moe_every=2, scan_layers=True),
    "lora + qwen3-style + scan": dict(lora_rank=4, qk_norm=True, qkv_bias=True, head_dim=16, scan_layers=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_parameter_axes_are_in_the_table(variant):
    mdef = model_def(dataclasses.replace(TINY, **VARIANTS[variant]))
    used = {a for axes in jax.tree.leaves(mdef.logical_axes(), is_leaf=lambda x: isinstance(x, tuple))
            for a in axes if a is not None}
    assert used, "the model annotates no parameter"
    assert used <= LOGICAL_AXES, f"not in parallel/rules.py: {sorted(used - LOGICAL_AXES)}"


def test_every_parameter_is_annotated():
    mdef = model_def(dataclasses.replace(TINY, **VARIANTS["learned+untied+bias+swiglu"]))
    shapes = jax.tree.leaves(mdef.param_shapes())
    axes = jax.tree.leaves(mdef.logical_axes(), is_leaf=lambda x: isinstance(x, tuple))
    assert len(shapes) == len(axes)
    for s, a in zip(shapes, axes):
        assert len(a) == len(s.shape)


def test_activation_axes_are_in_the_table():
    import re
    from pathlib import Path

    src = "".join(p.read_text() for p in (Path(__file__).parent.parent / "models").glob("*.py"))
    names = set()
    for call in re.findall(r"constrain\([^,]+,\s*\(([^)]*)\)", src):
        names |= set(re.findall(r'"([a-z_]+)"', call))
    assert {"batch", "act_embed"} <= names
    assert names <= LOGICAL_AXES, sorted(names - LOGICAL_AXES)


def test_table_names_only_mesh_axes():
    mesh = mesh_for(data=2, fsdp=2, tensor=2)
    assert set(mesh.axis_names) == set(MESH_AXES)
    for name, target in RULES:
        targets = target if isinstance(target, tuple) else (target,)
        for t in targets:
            assert t is None or t in mesh.axis_names, f"rule {name!r} -> unknown mesh axis {t!r}"

"""LoRA: a trainable low-rank update beside a frozen projection, y = x W + (x A) B * alpha / rank (as PEFT).

A projection that a LoRA target regex (`model.lora_targets`) names gets an `<weight>_lora` module holding A (the
weight's input axes x rank, uniform init as PEFT's kaiming) and B (rank x the weight's output axes, zeros, so a
fresh adapter changes nothing). An axis that the weight carries on both sides (the k/v pair of wkv, gate/up of
wi) keeps one adapter per slice, which is what PEFT's separate k_proj/v_proj (gate_proj/up_proj) adapters are.
The adapted weight is never formed while training; `merge` forms it for export.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from models.axes import param


@dataclasses.dataclass(frozen=True)
class Target:
    """How one projection is adapted: einsums x.A, (x A).B, and A.B (the weight-shaped delta), with A's and B's
    shapes as indices into the weight's shape (-1: the rank) and their logical axes."""
    x_a: str
    xa_b: str
    a_b: str
    a_dims: tuple[int, ...]
    b_dims: tuple[int, ...]
    a_axes: tuple[str | None, ...]
    b_axes: tuple[str | None, ...]


# The projections LoRA can adapt, by their parameter names in models/attention.py and models/mlp.py.
TARGETS = {
    "attn/wq_DNH": Target("btd,dr->btr", "btr,rnh->btnh", "dr,rnh->dnh", (0, -1), (-1, 1, 2),
                          ("embed", "lora"), ("lora", "heads", "head_dim")),
    "attn/wkv_D2KH": Target("btd,dsr->btsr", "btsr,srkh->btskh", "dsr,srkh->dskh", (0, 1, -1), (1, -1, 2, 3),
                            ("embed", None, "lora"), (None, "lora", "kv_heads", "head_dim")),
    "attn/wo_NHD": Target("btnh,nhr->btr", "btr,rd->btd", "nhr,rd->nhd", (0, 1, -1), (-1, 2),
                          ("heads", "head_dim", "lora"), ("lora", "embed")),
    "mlp/wi_DCF": Target("btd,dcr->btcr", "btcr,crf->btcf", "dcr,crf->dcf", (0, 1, -1), (1, -1, 2),
                         ("embed", None, "lora"), (None, "lora", "mlp")),
    "mlp/wo_FD": Target("btf,fr->btr", "btr,rd->btd", "fr,rd->fd", (0, -1), (-1, 1), ("mlp", "lora"),
                        ("lora", "embed")),
}


def matching_targets(pattern: str) -> list[str]:
    """The target names (keys of TARGETS) that the regex finds."""
    return [name for name in TARGETS if re.search(pattern, name)]


class LoRA(nnx.Module):
    def __init__(self, target: str, weight_shape: tuple[int, ...], rank: int, alpha: float, dropout: float,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        t = TARGETS[target]
        self.target, self.scale, self.dropout = target, alpha / rank, dropout
        a_shape = tuple(rank if d < 0 else weight_shape[d] for d in t.a_dims)
        b_shape = tuple(rank if d < 0 else weight_shape[d] for d in t.b_dims)
        fan_in = math.prod(weight_shape[d] for d in t.a_dims if d >= 0 and d not in t.b_dims)
        bound = 1.0 / math.sqrt(fan_in)
        self.wa = param(rngs, lambda k, s, dt: jax.random.uniform(k, s, dt, -bound, bound), a_shape, t.a_axes,
                        param_dtype)
        self.wb = param(rngs, jax.nn.initializers.zeros, b_shape, t.b_axes, param_dtype)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        t = TARGETS[self.target]
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        xa = jnp.einsum(t.x_a, x, self.wa[...].astype(x.dtype))
        return jnp.einsum(t.xa_b, xa, self.wb[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


def delta(target: str, wa: jax.Array, wb: jax.Array, scale: float) -> jax.Array:
    """The weight-shaped update scale * A B of one adapter (a leading stacked-layers axis is kept)."""
    spec = TARGETS[target].a_b
    if wa.ndim > len(spec.split(",")[0]):  # stacked layers (model.scan_layers)
        ins, out = spec.split("->")
        a, b = ins.split(",")
        spec = f"l{a},l{b}->l{out}"
    return jnp.einsum(spec, wa.astype(jnp.float32), wb.astype(jnp.float32)) * scale


def merge(params: dict, scale: float) -> dict:
    """Parameters with every adapter folded into its weight and the adapters removed (for export)."""
    out = {}
    for k, v in params.items():
        if isinstance(k, str) and k.endswith("_lora"):
            continue
        if isinstance(v, dict):
            v = merge(v, scale)
        adapter = params.get(f"{k}_lora") if isinstance(k, str) else None
        if adapter is not None:
            owner = next(name for name in TARGETS if name.endswith("/" + k))
            v = (v.astype(jnp.float32) + delta(owner, adapter["wa"], adapter["wb"], scale)).astype(v.dtype)
        out[k] = v
    return out


def is_adapter_path(path: str) -> bool:
    return "_lora/" in path

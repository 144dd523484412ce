"""Causal self-attention with grouped-query heads, rotary or no positions, and document (segment) masking.

Shape suffixes: B batch, T length, D d_model, N query heads, K key/value heads, H head dim.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.axes import constrain, param


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for rotary embeddings at the given (possibly per-document) positions."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles_BTh), jnp.sin(angles_BTh)


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    # Rotate pairs (first half, second half) of each head; computed in float32 for accuracy at long positions.
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def segment_mask(segment_ids_BT: jax.Array | None) -> jax.Array | None:
    """Boolean (B, 1, T, T) mask keeping attention inside each packed document; None for unpacked rows.

    Causality is not in this mask: a causal model passes `is_causal=True`, which cuDNN turns into its fast causal
    kernel (it skips the masked half) and XLA into the triangular mask.
    """
    if segment_ids_BT is None:
        return None
    return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


def why_not_cudnn(dtype: jnp.dtype, head_dim: int) -> str | None:
    """Why cuDNN's fused attention cannot run here, or None when it can."""
    if jax.default_backend() != "gpu":
        return f"cudnn runs on NVIDIA GPUs only, this run is on {jax.default_backend()}"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return "cudnn needs model.dtype bfloat16"
    if head_dim % 8 or head_dim > 128:
        return f"cudnn needs a head_dim (d_model / n_heads) that is a multiple of 8 up to 128, got {head_dim}"
    return None


def pick_implementation(requested: str, dtype: jnp.dtype, head_dim: int) -> str:
    """Resolve attention_impl "auto": cuDNN's fused kernel where it applies, XLA elsewhere (JAX's own default,
    implementation=None, is always XLA)."""
    if requested != "auto":
        return requested
    return "xla" if why_not_cudnn(dtype, head_dim) else "cudnn"


class Attention(nnx.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        use_bias: bool,
        init_std: float,
        out_std: float,
        implementation: Literal["xla", "cudnn", "auto"],
        dtype: jnp.dtype,
        param_dtype: jnp.dtype = jnp.float32,
        causal: bool = True,
        rngs: nnx.Rngs,
    ):
        head_dim = d_model // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.implementation = pick_implementation(implementation, dtype, head_dim)
        self.dtype, self.causal = dtype, causal
        init = jax.nn.initializers.normal(init_std)
        pd = param_dtype
        self.wq_DNH = param(rngs, init, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), pd)
        # k and v share one matmul: fewer, larger ops are faster on every backend.
        self.wkv_D2KH = param(rngs, init, (d_model, 2, n_kv_heads, head_dim), ("embed", None, "kv_heads", "head_dim"),
                              pd)
        self.wo_NHD = param(rngs, jax.nn.initializers.normal(out_std), (n_heads, head_dim, d_model),
                            ("heads", "head_dim", "embed"), pd)
        self.use_bias = use_bias
        if use_bias:
            zeros = jax.nn.initializers.zeros
            self.bq_NH = param(rngs, zeros, (n_heads, head_dim), ("heads", "head_dim"), pd)
            self.bkv_2KH = param(rngs, zeros, (2, n_kv_heads, head_dim), (None, "kv_heads", "head_dim"), pd)
            self.bo_D = param(rngs, zeros, (d_model,), ("embed",), pd)

    def __call__(self, x_BTD: jax.Array, mask: jax.Array | None, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        dt = self.dtype
        x_BTD = x_BTD.astype(dt)
        q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, self.wq_DNH[...].astype(dt))
        kv_BT2KH = jnp.einsum("btd,dskh->btskh", x_BTD, self.wkv_D2KH[...].astype(dt))
        if self.use_bias:
            q_BTNH = q_BTNH + self.bq_NH[...].astype(dt)
            kv_BT2KH = kv_BT2KH + self.bkv_2KH[...].astype(dt)
        k_BTKH, v_BTKH = kv_BT2KH[:, :, 0], kv_BT2KH[:, :, 1]
        if rope is not None:
            q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=self.causal,
                                                implementation=self.implementation)
        out_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, self.wo_NHD[...].astype(dt))
        if self.use_bias:
            out_BTD = out_BTD + self.bo_D[...].astype(dt)
        return out_BTD

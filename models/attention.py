"""Causal self-attention with grouped-query heads, rotary or no positions, and document (segment) masking.

Shape suffixes: B batch, T length, D d_model, N query heads, K key/value heads, H head dim.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.axes import constrain, param
from models.dense import dense
from models.lora import LoRA


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float,
                llama3: tuple[float, float, float, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for rotary embeddings at the given (possibly per-document) positions.

    llama3 = (factor, low_freq_factor, high_freq_factor, original_max_len): Llama 3.1's context extension, which
    slows the low frequencies by `factor`, keeps the high ones, and blends those in between.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if llama3 is not None:
        factor, low, high, old_len = llama3
        wavelen = 2 * jnp.pi / inv_freq
        slowed = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, (1 - smooth) * slowed / factor + smooth * slowed, slowed)
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


def rms_normalize(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32 (Qwen3's per-head query/key norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps) * scale).astype(x.dtype)


def cache_mask(positions_BT: jax.Array, starts_B: jax.Array, slots: int, at: jax.Array) -> jax.Array:
    """(B, 1, T, S) mask for queries written at cache slots at..at+T-1: each sees the filled slots up to its own,
    from its row's first real slot on (rows are left-padded to a common prompt length)."""
    query_slot_T = at + jnp.arange(positions_BT.shape[1])
    slot_S = jnp.arange(slots)
    mask_BTS = (slot_S[None, None, :] <= query_slot_T[None, :, None]) & (slot_S[None, None, :] >= starts_B[:, None, None])
    return mask_BTS[:, None]


class Attention(nnx.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        use_bias: bool,
        init_std: float,
        out_std: float,
        implementation: Literal["xla", "cudnn", "auto"],
        dtype: jnp.dtype,
        param_dtype: jnp.dtype = jnp.float32,
        causal: bool = True,
        qkv_bias: bool = False,
        qk_norm_eps: float = 0.0,
        lora: Callable[[str, tuple[int, ...]], LoRA | None] | None = None,
        qat: Callable[[str], str | None] | None = None,
        scale: float | None = None,
        rngs: nnx.Rngs,
    ):
        """scale: the attention scores' factor; None: 1/sqrt(head_dim) (muP passes its 1/head_dim form)."""
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale
        qat = qat or (lambda name: None)
        self.qat_q, self.qat_kv, self.qat_o = qat("attn/wq_DNH"), qat("attn/wkv_D2KH"), qat("attn/wo_NHD")
        self.implementation = pick_implementation(implementation, dtype, head_dim)
        self.dtype, self.causal, self.qk_norm_eps = dtype, causal, qk_norm_eps
        init = jax.nn.initializers.normal(init_std)
        pd = param_dtype
        self.wq_DNH = param(rngs, init, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"), pd)
        # k and v share one matmul: fewer, larger ops are faster on every backend.
        self.wkv_D2KH = param(rngs, init, (d_model, 2, n_kv_heads, head_dim), ("embed", None, "kv_heads", "head_dim"),
                              pd)
        self.wo_NHD = param(rngs, jax.nn.initializers.normal(out_std), (n_heads, head_dim, d_model),
                            ("heads", "head_dim", "embed"), pd)
        self.use_bias, self.qkv_bias = use_bias, use_bias or qkv_bias
        zeros = jax.nn.initializers.zeros
        if self.qkv_bias:
            self.bq_NH = param(rngs, zeros, (n_heads, head_dim), ("heads", "head_dim"), pd)
            self.bkv_2KH = param(rngs, zeros, (2, n_kv_heads, head_dim), (None, "kv_heads", "head_dim"), pd)
        if use_bias:
            self.bo_D = param(rngs, zeros, (d_model,), ("embed",), pd)
        if qk_norm_eps:
            ones = jax.nn.initializers.ones
            self.scale_q_H = param(rngs, ones, (head_dim,), ("head_dim",), pd)
            self.scale_k_H = param(rngs, ones, (head_dim,), ("head_dim",), pd)
        lora = lora or (lambda name, shape: None)
        self.wq_DNH_lora = lora("attn/wq_DNH", self.wq_DNH.shape)
        self.wkv_D2KH_lora = lora("attn/wkv_D2KH", self.wkv_D2KH.shape)
        self.wo_NHD_lora = lora("attn/wo_NHD", self.wo_NHD.shape)

    def __call__(self, x_BTD: jax.Array, mask: jax.Array | None, rope: tuple[jax.Array, jax.Array] | None,
                 key: jax.Array | None = None, cache: KVCache | None = None):
        """Attention over this call's tokens; with a cache, over the cache after writing this call's keys and
        values at slots cache.at.. (then `mask` is a cache_mask) and returns (output, updated cache)."""
        dt = self.dtype
        keys = jax.random.split(key, 3) if key is not None else (None,) * 3
        x_BTD = x_BTD.astype(dt)
        q_BTNH = dense(x_BTD, self.wq_DNH[...].astype(dt), qat=self.qat_q)
        kv_BT2KH = dense(x_BTD, self.wkv_D2KH[...].astype(dt), qat=self.qat_kv)
        if self.wq_DNH_lora is not None:
            q_BTNH = q_BTNH + self.wq_DNH_lora(x_BTD, keys[0])
        if self.wkv_D2KH_lora is not None:
            kv_BT2KH = kv_BT2KH + self.wkv_D2KH_lora(x_BTD, keys[1])
        if self.qkv_bias:
            q_BTNH = q_BTNH + self.bq_NH[...].astype(dt)
            kv_BT2KH = kv_BT2KH + self.bkv_2KH[...].astype(dt)
        k_BTKH, v_BTKH = kv_BT2KH[:, :, 0], kv_BT2KH[:, :, 1]
        if self.qk_norm_eps:
            q_BTNH = rms_normalize(q_BTNH, self.scale_q_H[...], self.qk_norm_eps)
            k_BTKH = rms_normalize(k_BTKH, self.scale_k_H[...], self.qk_norm_eps)
        if rope is not None:
            q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        if cache is not None:
            cache = cache.write(k_BTKH, v_BTKH)
            out_BTNH = cached_attention(q_BTNH, cache, mask, self.scale)
        else:
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=self.causal,
                                                    scale=self.scale, implementation=self.implementation)
        out_BTD = dense(out_BTNH, self.wo_NHD[...].astype(dt), 2, qat=self.qat_o)
        if self.wo_NHD_lora is not None:
            out_BTD = out_BTD + self.wo_NHD_lora(out_BTNH, keys[2])
        if self.use_bias:
            out_BTD = out_BTD + self.bo_D[...].astype(dt)
        return out_BTD if cache is None else (out_BTD, cache)


class KVCache(NamedTuple):
    """One layer's keys and values for generation, (B, K, S, H) each, and the slot the next write starts at.

    Heads before slots: the attention dots then batch over (B, K) and contract H with the cache in its stored
    layout, so a decode step never copies the whole cache into another layout (measured: with (B, S, K, H) the
    step time grew with the cache by a transposed copy per layer and step).
    """
    k_BKSH: jax.Array
    v_BKSH: jax.Array
    at: jax.Array  # int32 scalar

    @classmethod
    def zeros(cls, batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype) -> "KVCache":
        z = jnp.zeros((batch, n_kv_heads, slots, head_dim), dtype)
        return cls(z, z, jnp.zeros((), jnp.int32))

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array) -> "KVCache":
        def put(c, x_BTKH):
            x_BKTH = x_BTKH.astype(c.dtype).transpose(0, 2, 1, 3)
            c = jax.lax.dynamic_update_slice_in_dim(c, x_BKTH, self.at, axis=2)
            return constrain(c, ("batch", "act_kv_heads", "length", "head_dim"))

        return KVCache(put(self.k_BKSH, k_BTKH), put(self.v_BKSH, v_BTKH), self.at + k_BTKH.shape[1])


def cached_attention(q_BTNH: jax.Array, cache: KVCache, mask_B1TS: jax.Array, scale: float | None = None) -> jax.Array:
    """Softmax attention of this call's queries over the cache (float32 scores), grouped-query heads included;
    scores times `scale` (None: 1/sqrt(head_dim))."""
    B, T, N, H = q_BTNH.shape
    K = cache.k_BKSH.shape[1]
    q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKSH = cache.k_BKSH.astype(q_BTNH.dtype)
    scores_BKGTS = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32)
    # a finite floor: a left-padding query that sees no slot gets uniform weights instead of NaN, which would
    # reach the cache (and 0 * NaN is NaN) through its keys and values in the next layer
    scaled_BKGTS = scores_BKGTS / jnp.sqrt(H).astype(jnp.float32) if scale is None else scores_BKGTS * scale
    scores_BKGTS = jnp.where(mask_B1TS[:, :, None], scaled_BKGTS, -1e30)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(q_BTNH.dtype)
    out_BKGTH = jnp.einsum("bkgts,bksh->bkgth", probs_BKGTS, cache.v_BKSH.astype(q_BTNH.dtype))
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)

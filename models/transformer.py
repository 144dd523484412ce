"""Decoder-only transformer language model (Flax NNX).

Reads top to bottom: config, norms, one block, the stack. Shape suffixes: B batch, T length, D d_model,
V vocabulary, L layers. Every parameter names its logical axes; parallel/rules.py maps them onto the mesh.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention, attention_mask, rope_tables
from models.axes import constrain, param
from models.mlp import MLP

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "none": None,
    # Keep only each block's input; everything inside a block is recomputed in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work (norms, activations, softmax).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer when the run is built
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads; fewer gives grouped-query attention
    d_ff: int = 0  # 0: 4 * d_model for gelu, the parameter-matched 8/3 * d_model (rounded to 8) for swiglu
    max_seq_len: int = 256
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10_000.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    gelu_approximate: bool = True  # tanh GELU (as GPT-2); the exact erf form is much slower to differentiate on CPU
    tie_embeddings: bool = True
    use_bias: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    scan_layers: bool = False  # nnx.scan over layers: compile time stays flat as depth grows
    remat: Literal["none", "full", "dots"] = "none"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters are always float32
    attention_impl: Literal["xla", "cudnn", "auto"] = "xla"
    causal: bool = True  # False: bidirectional attention (masked-LM encoders); segments still separate documents

    def __post_init__(self):
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2 and self.positions == "rope":
            raise ValueError("model.d_model / model.n_heads must be even for rotary positions")
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({kv})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return 8 * math.ceil(8 * self.d_model / 3 / 8)
        return 4 * self.d_model


class Norm(nnx.Module):
    def __init__(self, dim: int, kind: str, rngs: nnx.Rngs):
        self.kind = kind
        self.scale_D = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",))
        if kind == "layernorm":
            self.bias_D = param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)  # statistics in float32 whatever the compute dtype
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * self.scale_D[...]
        if self.kind == "layernorm":
            y = y + self.bias_D[...]
        return y.astype(x_BTD.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual writes shrink with depth
        dtype = DTYPES[cfg.dtype]
        impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
        self.dropout = cfg.dropout
        self.attn_norm = Norm(cfg.d_model, cfg.norm, rngs)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, use_bias=cfg.use_bias, init_std=cfg.init_std,
                              out_std=out_std, implementation=impl, dtype=dtype, rngs=rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, rngs)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, kind=cfg.mlp, gelu_approximate=cfg.gelu_approximate,
                       use_bias=cfg.use_bias, init_std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, mask, rope, key: jax.Array | None):
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x_BTD = x_BTD + dropout(self.attn(self.attn_norm(x_BTD), mask, rope), self.dropout, k1)
        x_BTD = x_BTD + dropout(self.mlp(self.mlp_norm(x_BTD)), self.dropout, k2)
        return constrain(x_BTD, ("batch", "length", "act_embed"))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the run builder fills it from the tokenizer)")
        self.cfg = cfg
        init = jax.nn.initializers.normal(cfg.init_std)
        self.embed_VD = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if cfg.positions == "learned":
            self.pos_TD = param(rngs, init, (cfg.max_seq_len, cfg.d_model), ("length", "embed"))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg.d_model, cfg.norm, rngs)
        if not cfg.tie_embeddings:
            self.head_DV = param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        segment_ids_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Float32 logits (B, T, V). Segment ids keep attention inside each packed document."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # Look up in a gathered table: a gather from a table split over two mesh axes makes XLA replicate and
        # re-split the result, which is slower than the one all-gather FSDP needs anyway.
        x_BTD = jnp.take(constrain(self.embed_VD[...], (None, None)), tokens_BT, axis=0)
        if cfg.positions == "learned":
            x_BTD = x_BTD + jnp.take(self.pos_TD[...], positions_BT, axis=0)
        x_BTD = constrain(x_BTD.astype(DTYPES[cfg.dtype]), ("batch", "length", "act_embed"))
        if dropout_key is not None and cfg.dropout > 0:
            dropout_key, k = jax.random.split(dropout_key)
            x_BTD = dropout(x_BTD, cfg.dropout, k)
        else:
            dropout_key = None
        mask = attention_mask(segment_ids_BT, T, cfg.causal)
        rope = rope_tables(positions_BT, cfg.d_model // cfg.n_heads, cfg.rope_theta) if cfg.positions == "rope" else None
        x_BTD = self._blocks(x_BTD, mask, rope, dropout_key)
        x_BTD = self.final_norm(x_BTD)
        head_DV = self.embed_VD[...].T if cfg.tie_embeddings else self.head_DV[...]
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV.astype(x_BTD.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "length", "act_vocab"))

    def _blocks(self, x_BTD, mask, rope, dropout_key):
        cfg = self.cfg
        policy = REMAT_POLICIES[cfg.remat]
        keys = jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None

        def run_block(block, x, key):
            return block(x, mask, rope, key)

        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=policy)
        if not cfg.scan_layers:
            for i, block in enumerate(self.blocks):
                x_BTD = run_block(block, x_BTD, None if keys is None else keys[i])
            return x_BTD

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x, block, key):
            return run_block(block, x, None if keys is None else key)

        layer_keys = keys if keys is not None else jnp.zeros((cfg.n_layers,), jnp.uint32)
        return scan_blocks(x_BTD, self.blocks, layer_keys)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

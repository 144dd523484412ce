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
from jax.ad_checkpoint import checkpoint_name

from models.attention import Attention, rope_tables, segment_mask
from models.axes import constrain, embedding_lookup, param
from models.loss import head_logits
from models.mlp import MLP
from models.moe import MoEMLP

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
    """'auto' is bfloat16 where matmul units want it (GPU, TPU) and float32 on CPU, where bf16 is emulated."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return DTYPES[name]


# What the backward pass may keep from the forward pass of each layer; the rest is recomputed (jax.checkpoint).
REMAT_POLICIES = {
    "none": None,  # keep everything: fastest, most memory
    # Keep matmul outputs, recompute the cheap elementwise work (norms, activations, softmax, rotary).
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep only the residual stream where it enters the attention block and the MLP block of each layer.
    "save_block_inputs": jax.checkpoint_policies.save_only_these_names("block_input"),
    # Keep nothing inside a layer: only its input (the scan carry) survives; the layer is recomputed.
    "full": jax.checkpoint_policies.nothing_saveable,
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
    remat: Literal["none", "save_dots", "save_block_inputs", "full"] = "none"  # see REMAT_POLICIES
    # Precision policy: parameters (and so gradients and the optimizer update) in param_dtype, matmuls and
    # activations in dtype; norms' statistics, router, logits and the loss are always float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attention_impl: Literal["xla", "cudnn", "auto"] = "auto"  # auto: cuDNN where it applies, else XLA
    causal: bool = True  # False: bidirectional attention (masked-LM encoders); segments still separate documents
    # Mixture of experts: with moe_experts > 0 the MLP of every moe_every-th layer (the last of each group of
    # moe_every) is a sparse MoE block of moe_experts experts, each token going to its moe_top_k best.
    moe_experts: int = 0
    moe_every: int = 1
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25  # slots per expert = ceil(top_k * tokens * factor / experts); <= 0: dropless
    moe_d_ff: int = 0  # hidden width of each expert; 0: the dense MLP's width
    moe_lb_weight: float = 0.01  # load-balancing loss weight (Switch Transformer), per MoE layer
    moe_z_weight: float = 0.001  # router z-loss weight (ST-MoE), per MoE layer
    # Tokens per device whose float32 logits the training loss holds at once (models/loss.py); 0: as many as
    # keep one chunk under 256 MiB (2^26 / vocab_size tokens), which never chunks a small vocabulary.
    loss_chunk: int = 0

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
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk must be >= 0 (0: automatic), got {self.loss_chunk}")
        if self.moe_experts < 0 or self.moe_every < 1:
            raise ValueError("model.moe_experts must be >= 0 and model.moe_every >= 1")
        if self.moe_experts:
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise ValueError(f"model.moe_top_k must be in [1, model.moe_experts={self.moe_experts}], "
                                 f"got {self.moe_top_k}")
            if self.n_layers % self.moe_every:
                raise ValueError(f"model.n_layers ({self.n_layers}) must be a multiple of model.moe_every "
                                 f"({self.moe_every})")

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

    @property
    def loss_chunk_tokens(self) -> int:
        return self.loss_chunk or max(1, 2**26 // max(self.vocab_size, 1))

    @property
    def expert_ff_dim(self) -> int:
        return self.moe_d_ff or self.ff_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_experts > 0 and (i + 1) % self.moe_every == 0

    @property
    def grouped_layers(self) -> bool:
        """Dense and MoE layers alternate (moe_every > 1): a scan step is a LayerGroup of moe_every layers."""
        return self.moe_experts > 0 and self.moe_every > 1


class Norm(nnx.Module):
    def __init__(self, dim: int, kind: str, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.kind = kind
        self.scale_D = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",), param_dtype)
        if kind == "layernorm":
            self.bias_D = param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",), param_dtype)

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
    """Pre-norm attention block then MLP block, each added to the residual stream. Returns the new stream and
    the MoE routing statistics of this layer ({} for a dense MLP)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, moe: bool = False):
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual writes shrink with depth
        dtype, pd = compute_dtype(cfg.dtype), DTYPES[cfg.param_dtype]
        self.dropout = cfg.dropout
        self.attn_norm = Norm(cfg.d_model, cfg.norm, rngs, pd)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, use_bias=cfg.use_bias, init_std=cfg.init_std,
                              out_std=out_std, implementation=cfg.attention_impl, dtype=dtype, param_dtype=pd, causal=cfg.causal,
                              rngs=rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, rngs, pd)
        if moe:
            self.mlp = MoEMLP(cfg.d_model, cfg.expert_ff_dim, cfg.moe_experts, top_k=cfg.moe_top_k,
                              capacity_factor=cfg.moe_capacity_factor, kind=cfg.mlp,
                              gelu_approximate=cfg.gelu_approximate, init_std=cfg.init_std, out_std=out_std,
                              dtype=dtype, param_dtype=pd, rngs=rngs)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ff_dim, kind=cfg.mlp, gelu_approximate=cfg.gelu_approximate,
                           use_bias=cfg.use_bias, init_std=cfg.init_std, out_std=out_std, dtype=dtype,
                           param_dtype=pd, rngs=rngs)

    def __call__(self, x_BTD, mask, rope, key: jax.Array | None):
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x_BTD = checkpoint_name(x_BTD, "block_input")
        x_BTD = x_BTD + dropout(self.attn(self.attn_norm(x_BTD), mask, rope), self.dropout, k1)
        x_BTD = checkpoint_name(x_BTD, "block_input")
        if isinstance(self.mlp, MoEMLP):
            y_BTD, stats = self.mlp(self.mlp_norm(x_BTD))
        else:
            y_BTD, stats = self.mlp(self.mlp_norm(x_BTD)), {}
        x_BTD = x_BTD + dropout(y_BTD, self.dropout, k2)
        return constrain(x_BTD, ("batch", "length", "act_embed")), stats


class LayerGroup(nnx.Module):
    """moe_every consecutive layers, the last with an MoE block: the repeating unit that nnx.scan stacks when
    dense and MoE layers alternate (a scan needs every step to have the same parameters)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(cfg, rngs, moe=j == cfg.moe_every - 1) for j in range(cfg.moe_every)])

    def __call__(self, x_BTD, mask, rope, key: jax.Array | None):
        keys = jax.random.split(key, len(self.layers)) if key is not None else [None] * len(self.layers)
        stats = {}
        for layer, k in zip(self.layers, keys):
            x_BTD, s = layer(x_BTD, mask, rope, k)
            stats = s or stats
        return x_BTD, stats


def scan_units(cfg: ModelConfig) -> int:
    """Steps of the layer scan: one per layer, or one per LayerGroup when dense and MoE layers alternate."""
    return cfg.n_layers // cfg.moe_every if cfg.grouped_layers else cfg.n_layers


def moe_aux(cfg: ModelConfig, stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The MoE layers' statistics (stacked over MoE layers) as means for the step metrics, and `aux_loss`: the
    weighted auxiliary losses that the train step adds to the language-model loss (summed over MoE layers, as
    Switch and ST-MoE do)."""
    if not stacked:
        return {}
    aux = {k: v.mean(0) for k, v in stacked.items()}
    aux["aux_loss"] = cfg.moe_lb_weight * stacked["moe_lb_loss"].sum() + cfg.moe_z_weight * stacked["moe_z_loss"].sum()
    return aux


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the run builder fills it from the tokenizer)")
        self.cfg = cfg
        init = jax.nn.initializers.normal(cfg.init_std)
        pd = DTYPES[cfg.param_dtype]
        self.embed_VD = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd)
        if cfg.positions == "learned":
            self.pos_TD = param(rngs, init, (cfg.max_seq_len, cfg.d_model), ("length", "embed"), pd)
        if cfg.scan_layers:
            # One stacked unit per scan step: a Block, or a LayerGroup when dense and MoE layers alternate.

            @nnx.split_rngs(splits=scan_units(cfg))
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return LayerGroup(cfg, rngs) if cfg.grouped_layers else Block(cfg, rngs, moe=cfg.moe_experts > 0)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers)])
        self.final_norm = Norm(cfg.d_model, cfg.norm, rngs, pd)
        if not cfg.tie_embeddings:
            self.head_DV = param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        segment_ids_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        return_aux: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Float32 logits (B, T, V). Segment ids keep attention inside each packed document.

        With return_hidden, the final normed hidden states (B, T, D) instead: the training loss turns them into
        logits a chunk at a time with `head_weights()` (models/loss.py). With return_aux, also a dict of MoE
        statistics and the weighted auxiliary loss `aux_loss` (empty for a dense model); see moe_aux.
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = embedding_lookup(self.embed_VD[...], tokens_BT)
        if cfg.positions == "learned":
            x_BTD = x_BTD + jnp.take(self.pos_TD[...], positions_BT, axis=0)
        x_BTD = constrain(x_BTD.astype(compute_dtype(cfg.dtype)), ("batch", "length", "act_embed"))
        if dropout_key is not None and cfg.dropout > 0:
            dropout_key, k = jax.random.split(dropout_key)
            x_BTD = dropout(x_BTD, cfg.dropout, k)
        else:
            dropout_key = None
        mask = segment_mask(segment_ids_BT)
        rope = rope_tables(positions_BT, cfg.d_model // cfg.n_heads, cfg.rope_theta) if cfg.positions == "rope" else None
        x_BTD, stats = self._blocks(x_BTD, mask, rope, dropout_key)
        x_BTD = self.final_norm(x_BTD)
        out = x_BTD if return_hidden else head_logits(x_BTD, self.head_weights())
        return (out, moe_aux(cfg, stats)) if return_aux else out

    def head_weights(self) -> jax.Array:
        """The output head (D, V): the transposed embedding when tied."""
        return self.embed_VD[...].T if self.cfg.tie_embeddings else self.head_DV[...]

    def _blocks(self, x_BTD, mask, rope, dropout_key) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run the layers; returns the residual stream and the MoE layers' statistics stacked ({} if dense)."""
        cfg = self.cfg
        policy = REMAT_POLICIES[cfg.remat]

        def run_block(block, x, key):
            return block(x, mask, rope, key)

        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=policy)
        if not cfg.scan_layers:
            keys = jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None
            stats = []
            for i, block in enumerate(self.blocks):
                x_BTD, s = run_block(block, x_BTD, None if keys is None else keys[i])
                stats += [s] if s else []
            return x_BTD, jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else {}

        n_units = scan_units(cfg)
        keys = jax.random.split(dropout_key, n_units) if dropout_key is not None else None

        @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x, block, key):
            return run_block(block, x, None if keys is None else key)

        layer_keys = keys if keys is not None else jnp.zeros((n_units,), jnp.uint32)
        return scan_blocks(x_BTD, self.blocks, layer_keys)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

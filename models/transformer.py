"""Decoder-only transformer language model (Flax NNX).

Reads top to bottom: config, norms, one block, the stack. Shape suffixes: B batch, T length, D d_model,
V vocabulary, L layers. Every parameter names its logical axes; parallel/rules.py maps them onto the mesh.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.attention import Attention, KVCache, cache_mask, rope_tables, segment_mask
from models.axes import constrain, embedding_lookup, param
from models.lora import TARGETS, LoRA, matching_targets
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
    # Keep matmul outputs, recompute the cheap elementwise work (norms, activations, softmax, rotary). The
    # projections are named "dense" (models/dense.py: on a CPU their custom gradient hides the matmul).
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("dense")),
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
    head_dim: int = 0  # 0: d_model // n_heads (Qwen3 sets its own)
    d_ff: int = 0  # 0: 4 * d_model for gelu, the parameter-matched 8/3 * d_model (rounded to 8) for swiglu
    max_seq_len: int = 256
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10_000.0
    # RoPE context extension: "llama3" (Llama 3.1+) with these factors and the original context length.
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    gelu_approximate: bool = True  # tanh GELU (as GPT-2); the exact erf form is much slower to differentiate on CPU
    tie_embeddings: bool = True
    use_bias: bool = False  # biases on every projection (GPT-2)
    qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    dropout: float = 0.0
    init_std: float = 0.02
    # Hyperparameter transfer across width (muP, Tensor Programs V; see mup_std, mup_attention_scale, head_weights
    # and optim.chains.mup_lr_multipliers): "mup" scales the hidden matrices' init by 1/sqrt(width_mult), attention
    # scores by 1/head_dim, the logits by 1/width_mult and Adam's lr of the hidden matrices by 1/width_mult, where
    # width_mult = d_model / mup_base_width. At d_model == mup_base_width it is the standard model.
    parametrization: Literal["standard", "mup"] = "standard"
    mup_base_width: int = 0  # the d_model the hyperparameters were tuned at; required with "mup"
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
    # LoRA (models/lora.py): with lora_rank > 0, the projections whose names (attn/wq_DNH, attn/wkv_D2KH, attn/wo_NHD,
    # mlp/wi_DCF, mlp/wo_FD) lora_targets finds (re.search) get an adapter scaled by lora_alpha / lora_rank.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn/|mlp/"
    # Quantization-aware training (models/quant.py): the projections qat_targets finds (names as for LoRA) compute
    # with int8 fake-quantized weights ("int8_weights") or weights and inputs ("int8"; per output channel and per
    # token, qwix's absmax numerics), or fp8 (e4m3) weights and inputs ("fp8", what H100/H200 matmuls take), the
    # gradient passing straight through to the float weights.
    # "int8_inputs" (the inputs only) is what an export of an int8 run uses once its weights are stored as int8.
    qat: Literal["none", "int8", "int8_weights", "int8_inputs", "fp8"] = "none"
    qat_targets: str = "attn/|mlp/"
    # Tokens per device whose float32 logits the training loss holds at once (models/loss.py); 0: as many as
    # keep one chunk under 256 MiB (2^26 / vocab_size tokens), which never chunks a small vocabulary.
    loss_chunk: int = 0

    def __post_init__(self):
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads and not self.head_dim:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim < 0 or self.norm_eps <= 0:
            raise ValueError("model.head_dim must be >= 0 (0: d_model / n_heads) and model.norm_eps > 0")
        if self.head_size % 2 and self.positions == "rope":
            raise ValueError("model.head_dim (d_model / n_heads by default) must be even for rotary positions")
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({kv})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk must be >= 0 (0: automatic), got {self.loss_chunk}")
        if self.rope_scaling == "llama3" and not (self.rope_factor > 0 and self.rope_high_freq_factor >
                                                  self.rope_low_freq_factor > 0 and self.rope_original_max_len > 0):
            raise ValueError("model.rope_scaling llama3 needs rope_factor > 0, rope_high_freq_factor > "
                             "rope_low_freq_factor > 0 and rope_original_max_len > 0")
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("model.lora_rank must be >= 0 and model.lora_dropout in [0, 1)")
        try:
            re.compile(self.lora_targets)
        except re.error as e:
            raise ValueError(f"model.lora_targets: {self.lora_targets!r} is not a regex ({e})") from None
        if self.qat not in QAT_MODES:
            raise ValueError(f"model.qat: {self.qat!r} is not one of {', '.join(QAT_MODES)}")
        try:
            re.compile(self.qat_targets)
        except re.error as e:
            raise ValueError(f"model.qat_targets: {self.qat_targets!r} is not a regex ({e})") from None
        if self.qat != "none" and importlib.util.find_spec("qwix") is None:
            raise ValueError("model.qat needs qwix: pip install -e '.[edge]'")
        if self.qat != "none" and not matching_targets(self.qat_targets):
            raise ValueError(f"model.qat_targets: {self.qat_targets!r} matches no projection; choose among "
                             "attn/wq_DNH, attn/wkv_D2KH, attn/wo_NHD, mlp/wi_DCF, mlp/wo_FD")
        if self.lora_rank and not matching_targets(self.lora_targets):
            raise ValueError(f"model.lora_targets: {self.lora_targets!r} matches no projection; choose among "
                             f"{', '.join(TARGETS)} (a regex, e.g. 'attn/' or 'wq|wkv')")
        self._check_parametrization()
        if self.moe_experts < 0 or self.moe_every < 1:
            raise ValueError("model.moe_experts must be >= 0 and model.moe_every >= 1")
        if self.moe_experts:
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise ValueError(f"model.moe_top_k must be in [1, model.moe_experts={self.moe_experts}], "
                                 f"got {self.moe_top_k}")
            if self.n_layers % self.moe_every:
                raise ValueError(f"model.n_layers ({self.n_layers}) must be a multiple of model.moe_every "
                                 f"({self.moe_every})")

    def _check_parametrization(self) -> None:
        if self.parametrization not in ("standard", "mup"):
            raise ValueError(f"model.parametrization: {self.parametrization!r} is not one of standard, mup")
        if self.mup_base_width < 0 or (self.parametrization == "mup" and self.mup_base_width == 0):
            raise ValueError(f"model.mup_base_width must be > 0 with model.parametrization mup (the d_model the "
                             f"hyperparameters were tuned at), got {self.mup_base_width}")
        # The router (width in, experts out) and LoRA's down-projection are readout-like matrices whose muP rule
        # is not implemented here; refusing beats training them with a silently wrong scale.
        if self.parametrization == "mup" and (self.moe_experts or self.lora_rank):
            raise ValueError("model.parametrization mup covers dense models without LoRA adapters; "
                             "set model.moe_experts 0 and model.lora_rank 0, or use the standard parametrization")

    @property
    def width_mult(self) -> float:
        """d_model / mup_base_width under muP; 1.0 in the standard parametrization."""
        return self.d_model / self.mup_base_width if self.parametrization == "mup" else 1.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.d_model // self.n_heads

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
    def __init__(self, dim: int, kind: str, rngs: nnx.Rngs, param_dtype=jnp.float32, eps: float = 1e-5):
        self.kind, self.eps = kind, eps
        self.scale_D = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",), param_dtype)
        if kind == "layernorm":
            self.bias_D = param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)  # statistics in float32 whatever the compute dtype
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale_D[...]
        if self.kind == "layernorm":
            y = y + self.bias_D[...]
        return y.astype(x_BTD.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


QAT_MODES = ("none", "int8", "int8_weights", "int8_inputs", "fp8")


def qat_factory(cfg: ModelConfig):
    """projection name -> its quantization-aware training mode (ModelConfig.qat), None when not targeted."""
    targets = set(matching_targets(cfg.qat_targets)) if cfg.qat != "none" else set()
    return lambda name: cfg.qat if name in targets else None


def lora_factory(cfg: ModelConfig, rngs: nnx.Rngs):
    """name, weight shape -> a LoRA adapter for the targeted projections (None elsewhere, or without LoRA)."""
    targets = set(matching_targets(cfg.lora_targets)) if cfg.lora_rank else set()

    def make(name: str, shape: tuple[int, ...]) -> LoRA | None:
        if name not in targets:
            return None
        # float32 whatever model.param_dtype: bfloat16 would round away an adapter's small updates (PEFT does the same)
        return LoRA(name, shape, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, rngs, jnp.float32)

    return make


def mup_std(cfg: ModelConfig, std: float) -> float:
    """Init std of a hidden matrix (fan-in grows with the width): under muP its variance shrinks as 1/width_mult,
    i.e. as 1/fan_in relative to the base model, which therefore keeps the standard init exactly."""
    return std / math.sqrt(cfg.width_mult) if cfg.parametrization == "mup" else std


def mup_attention_scale(cfg: ModelConfig) -> float | None:
    """The attention score scale; None: the standard 1/sqrt(head_dim).

    muP scales scores by 1/head_dim (query and key become correlated during training, so their dot product
    grows as head_dim, not sqrt(head_dim)). The constant sqrt(H0), H0 = head_dim / width_mult the head size at
    the base width, makes the base model the standard one: sqrt(H0) / H = 1/sqrt(H) / sqrt(width_mult), written
    so, which at width_mult 1 is the standard factor to the bit. This assumes the width grows through the head
    size (model.n_heads fixed, as in Tensor Programs V); were it to grow through more heads of a fixed size,
    1/sqrt(H) would already be muP's scaling and this one would shrink the scores by a needless 1/sqrt(width_mult).
    """
    if cfg.parametrization != "mup":
        return None
    return 1.0 / math.sqrt(cfg.head_size) / math.sqrt(cfg.width_mult)


class Block(nnx.Module):
    """Pre-norm attention block then MLP block, each added to the residual stream. Returns the new stream, the MoE
    routing statistics of this layer ({} for a dense MLP) and the layer's updated KV cache (None without one)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, moe: bool = False):
        init_std = mup_std(cfg, cfg.init_std)
        out_std = mup_std(cfg, cfg.init_std / math.sqrt(2 * cfg.n_layers))  # GPT-2: residual writes shrink with depth
        dtype, pd = compute_dtype(cfg.dtype), DTYPES[cfg.param_dtype]
        self.dropout = cfg.dropout
        self.lora_dropout = cfg.lora_rank > 0 and cfg.lora_dropout > 0
        lora = lora_factory(cfg, rngs)
        self.attn_norm = Norm(cfg.d_model, cfg.norm, rngs, pd, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, use_bias=cfg.use_bias,
                              qkv_bias=cfg.qkv_bias, qk_norm_eps=cfg.norm_eps if cfg.qk_norm else 0.0,
                              init_std=init_std, out_std=out_std, implementation=cfg.attention_impl, dtype=dtype,
                              scale=mup_attention_scale(cfg), param_dtype=pd, causal=cfg.causal, lora=lora,
                              qat=qat_factory(cfg), rngs=rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg.norm, rngs, pd, cfg.norm_eps)
        if moe:
            self.mlp = MoEMLP(cfg.d_model, cfg.expert_ff_dim, cfg.moe_experts, top_k=cfg.moe_top_k,
                              capacity_factor=cfg.moe_capacity_factor, kind=cfg.mlp,
                              gelu_approximate=cfg.gelu_approximate, init_std=init_std, out_std=out_std,
                              dtype=dtype, param_dtype=pd, rngs=rngs)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ff_dim, kind=cfg.mlp, gelu_approximate=cfg.gelu_approximate,
                           use_bias=cfg.use_bias, init_std=init_std, out_std=out_std, dtype=dtype,
                           param_dtype=pd, lora=lora, qat=qat_factory(cfg), rngs=rngs)

    def __call__(self, x_BTD, mask, rope, key: jax.Array | None, cache: KVCache | None = None,
                 act_stats: bool = False):
        """With act_stats the statistics also hold `act_ms`, the mean square of the output stream (diagnostics)."""
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        # LoRA dropout draws its own keys (fold_in), so adding adapters leaves the block's dropout masks as they were.
        k_attn, k_mlp = (jax.random.fold_in(key, 3), jax.random.fold_in(key, 4)) \
            if key is not None and self.lora_dropout else (None, None)
        x_BTD = checkpoint_name(x_BTD, "block_input")
        y_BTD = self.attn(self.attn_norm(x_BTD), mask, rope, k_attn, cache)
        if cache is not None:
            y_BTD, cache = y_BTD
        x_BTD = x_BTD + dropout(y_BTD, self.dropout, k1)
        x_BTD = checkpoint_name(x_BTD, "block_input")
        if isinstance(self.mlp, MoEMLP):
            y_BTD, stats = self.mlp(self.mlp_norm(x_BTD), dropless=cache is not None)
        else:
            y_BTD, stats = self.mlp(self.mlp_norm(x_BTD), k_mlp), {}
        x_BTD = constrain(x_BTD + dropout(y_BTD, self.dropout, k2), ("batch", "length", "act_embed"))
        if act_stats:
            stats = {**stats, "act_ms": mean_square(x_BTD)}
        return x_BTD, stats, cache


class LayerGroup(nnx.Module):
    """moe_every consecutive layers, the last with an MoE block: the repeating unit that nnx.scan stacks when
    dense and MoE layers alternate (a scan needs every step to have the same parameters)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(cfg, rngs, moe=j == cfg.moe_every - 1) for j in range(cfg.moe_every)])

    def __call__(self, x_BTD, mask, rope, key: jax.Array | None, cache: tuple | None = None,
                 act_stats: bool = False):
        """With act_stats the statistics also hold `act_ms` (moe_every,): each layer's, in order."""
        keys = jax.random.split(key, len(self.layers)) if key is not None else [None] * len(self.layers)
        stats, caches, act_ms = {}, [], []
        for i, (layer, k) in enumerate(zip(self.layers, keys)):
            x_BTD, s, c = layer(x_BTD, mask, rope, k, None if cache is None else cache[i], act_stats)
            if act_stats:
                act_ms.append(s["act_ms"])
                s = {name: v for name, v in s.items() if name != "act_ms"}
            stats, caches = s or stats, caches + [c]
        if act_stats:
            stats = {**stats, "act_ms": jnp.stack(act_ms)}
        return x_BTD, stats, None if cache is None else tuple(caches)


def mean_square(x_BTD: jax.Array) -> jax.Array:
    """The mean square of an activation over all its positions, in float32 (training diagnostics)."""
    x = x_BTD.astype(jnp.float32)
    return jnp.mean(x * x)


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
        self.final_norm = Norm(cfg.d_model, cfg.norm, rngs, pd, cfg.norm_eps)
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
        act_stats: bool = False,
        cache=None,
        cache_starts_B: jax.Array | None = None,
    ):
        """Float32 logits (B, T, V). Segment ids keep attention inside each packed document.

        With return_hidden, the final normed hidden states (B, T, D) instead: the training loss turns them into
        logits a chunk at a time with `head_weights()` (models/loss.py). With return_aux, also a dict of MoE
        statistics and the weighted auxiliary loss `aux_loss` (empty for a dense model); see moe_aux. With
        act_stats (and return_aux) the dict also holds `act_ms` (L,): the mean square of the residual stream at
        each layer's output (training diagnostics, train/diagnostics.py); without it nothing of that is computed.
        With a KV cache (init_cache; generation), tokens_BT go to the cache slots from its write position on and
        the call returns (logits, updated cache); row b's tokens start at slot cache_starts_B[b] (left padding).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = embedding_lookup(self.embed_VD[...], tokens_BT)
        if cfg.positions == "learned":
            x_BTD = x_BTD + jnp.take(self.pos_TD[...], positions_BT, axis=0)
        x_BTD = constrain(x_BTD.astype(compute_dtype(cfg.dtype)), ("batch", "length", "act_embed"))
        if dropout_key is not None and (cfg.dropout > 0 or cfg.lora_dropout > 0):
            dropout_key, k = jax.random.split(dropout_key)
            x_BTD = dropout(x_BTD, cfg.dropout, k)
        else:
            dropout_key = None
        if cache is None:
            mask = segment_mask(segment_ids_BT)
        else:
            slots = jax.tree.leaves(cache)[0].shape[-2]  # every layer's cache has the same slots
            mask = cache_mask(positions_BT, cache_starts_B, slots, cache_position(cache))
        llama3 = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len) \
            if cfg.rope_scaling == "llama3" else None
        rope = rope_tables(positions_BT, cfg.head_size, cfg.rope_theta, llama3) if cfg.positions == "rope" else None
        x_BTD, stats, cache = self._blocks(x_BTD, mask, rope, dropout_key, cache, act_stats and cache is None)
        act = {"act_ms": stats.pop("act_ms").reshape(-1)} if "act_ms" in stats else {}  # layer order
        x_BTD = self.final_norm(x_BTD)
        out = x_BTD if return_hidden else head_logits(x_BTD, self.head_weights())
        if cache is not None:
            return out, cache
        return (out, {**moe_aux(cfg, stats), **act}) if return_aux else out

    def head_weights(self) -> jax.Array:
        """The output head (D, V): the transposed embedding when tied.

        Under muP the head is multiplied by 1/width_mult (Tensor Programs V's readout multiplier): the hidden
        state's coordinates stay O(1) as the width grows and become correlated with the head's, so their dot
        product would grow as the width. The multiplier sits here, not on the stored weights, so the readout keeps
        the standard init and Adam lr; a tied embedding is then both the input embedding and (times 1/width_mult)
        the readout, which is how the mup package ties them (MuSharedReadout). Both the plain logits and the
        chunked training loss take their head from here.
        """
        head_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.head_DV[...]
        if self.cfg.parametrization == "mup":
            head_DV = head_DV * (1.0 / self.cfg.width_mult)
        return head_DV

    def _blocks(self, x_BTD, mask, rope, dropout_key, cache, act_stats: bool = False):
        """Run the layers: (residual stream, MoE statistics stacked over layers ({} if dense), updated cache). With
        act_stats the statistics also hold `act_ms`, stacked (L,), or (units, moe_every) with grouped layers."""
        cfg = self.cfg
        policy = REMAT_POLICIES[cfg.remat]

        def run_block(block, x, key, c):
            return block(x, mask, rope, key, c, act_stats)

        if cfg.remat != "none" and cache is None:
            run_block = nnx.remat(run_block, policy=policy)
        if not cfg.scan_layers:
            keys = jax.random.split(dropout_key, cfg.n_layers) if dropout_key is not None else None
            stats, caches, act_ms = [], [], []
            for i, block in enumerate(self.blocks):
                x_BTD, s, c = run_block(block, x_BTD, None if keys is None else keys[i],
                                        None if cache is None else cache[i])
                if act_stats:  # every layer has one; only the MoE layers have the other statistics
                    act_ms.append(s["act_ms"])
                    s = {k: v for k, v in s.items() if k != "act_ms"}
                stats, caches = stats + ([s] if s else []), caches + [c]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else {}
            if act_stats:
                stacked = {**stacked, "act_ms": jnp.stack(act_ms)}
            return x_BTD, stacked, None if cache is None else caches

        n_units = scan_units(cfg)
        keys = jax.random.split(dropout_key, n_units) if dropout_key is not None else None

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_blocks(x, block, key, c):
            return run_block(block, x, None if keys is None else key, c)

        layer_keys = keys if keys is not None else jnp.zeros((n_units,), jnp.uint32)
        return scan_blocks(x_BTD, self.blocks, layer_keys, cache)


def cache_position(cache) -> jax.Array:
    """The slot the next token is written to (every layer's cache holds the same one; stacked when scanned)."""
    return jax.tree.leaves(cache)[-1].reshape(-1)[0]


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32):
    """Empty KV caches shaped like the layer stack: a list per layer, or stacked (units, ...) when scanned."""
    one = lambda: KVCache.zeros(batch, slots, cfg.kv_heads, cfg.head_size, dtype)  # noqa: E731
    per_unit = (lambda: tuple(one() for _ in range(cfg.moe_every))) if cfg.grouped_layers else one
    if not cfg.scan_layers:
        return [one() for _ in range(cfg.n_layers)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[per_unit() for _ in range(scan_units(cfg))])


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

"""HuggingFace model families as tables: HF config keys -> ModelConfig fields, HF tensors -> meshforge params.

One transformer (models/transformer.py) serves every family; a family only says how its checkpoint is laid out.
A parameter's row is a view in einops notation (interop/layout.py reads and writes it): `src` names the HF
tensor's axes, `dst` the meshforge parameter's, with factors d (d_model), n (query heads), k (kv heads),
h (head_dim), f (d_ff), v (vocabulary), p (positions), c (the q/k/v thirds of GPT-2's fused c_attn), s (which of
several HF tensors stacked on one meshforge axis, e.g. k_proj/v_proj -> wkv_D2KH) and 1 (a unit axis).
GPT-2's Conv1D stores (in, out), torch Linear (out, in): the strings say which.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from models.transformer import ModelConfig
from parallel.errors import UserError

VOCAB_MULTIPLE = 64  # embedding/head rows are zero-padded to this: shards evenly, matmul-friendly


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One meshforge parameter as a view of one HF tensor (or of several, stacked along factor s)."""
    path: str  # meshforge path, '{i}' for the layer: blocks/{i}/attn/wq_DNH
    hf: tuple[str, ...]  # HF tensor name(s), '{i}' for the layer
    src: str  # HF tensor axes: 'd (c n h)'
    dst: str  # meshforge axes: 'd n h'
    offset: tuple[tuple[str, int], ...] = ()  # a factor's first source index (GPT-2 k/v start at third c=1)
    # Rows over head_dim that RoPE rotates (q and k, not v): permuted when the family stores interleaved pairs.
    # True: all of the tensor; (factor, i): only where that meshforge factor is i (k of the stacked k/v).
    rope: bool | tuple[str, int] = False


def t(path: str, hf: str | tuple[str, ...], src: str, dst: str, *, rope: bool | tuple[str, int] = False,
      **offset: int) -> Tensor:
    return Tensor(path, (hf,) if isinstance(hf, str) else hf, src, dst, tuple(offset.items()), rope)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # what export writes into config.json's `architectures`
    model_type: str
    tensors: tuple[Tensor, ...]
    to_model: Callable[[dict], dict[str, Any]]  # HF config -> ModelConfig fields (UserError if unsupported)
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> HF config entries
    misfit: Callable[[ModelConfig], str | None]  # the first model.* key this family cannot express, or None
    interleaved: bool = False  # the checkpoint stores RoPE pairs (2i, 2i+1) instead of halves (i, i + H/2)
    aliases: tuple[str, ...] = ()  # other `architectures` entries that read the same


def padded_vocab(v: int) -> int:
    return VOCAB_MULTIPLE * math.ceil(v / VOCAB_MULTIPLE)


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_size


def factor_sizes(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Source-side sizes of the table's factors for a model; vocab_size is the real (unpadded) vocabulary."""
    return {"d": cfg.d_model, "n": cfg.n_heads, "k": cfg.kv_heads, "h": head_dim(cfg), "f": cfg.ff_dim,
            "v": vocab_size, "p": cfg.max_seq_len, "c": 3, "1": 1}


# ---------------------------------------------------------------------------------------------- HF config

def need(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise UserError(f"config.json: `{key}` is missing; the {hf.get('model_type')} family needs it")
    return hf[key]


def rope_fields(hf: dict) -> dict[str, Any]:
    """RoPE base and scaling. transformers >= 5 writes `rope_parameters`, older versions `rope_theta` and
    `rope_scaling`; both are read. Unscaled and Llama 3.1's "llama3" scaling are supported."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    fields: dict[str, Any] = {"rope_scaling": "none"}
    for key, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind == "llama3":
            try:
                fields = {"rope_scaling": "llama3", "rope_factor": float(spec["factor"]),
                          "rope_low_freq_factor": float(spec["low_freq_factor"]),
                          "rope_high_freq_factor": float(spec["high_freq_factor"]),
                          "rope_original_max_len": int(spec["original_max_position_embeddings"])}
            except KeyError as e:
                raise UserError(f"config.json: `{key}` of rope_type llama3 lacks {e.args[0]!r}") from None
        elif kind not in (None, "default"):
            raise UserError(f"config.json: `{key}` has rope_type {kind!r}; supported: default (unscaled) and "
                            "llama3")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return {"rope_theta": float(10_000.0 if theta is None else theta), **fields}


def no_sliding_window(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise UserError("config.json: `use_sliding_window` is true; sliding-window attention is not supported, "
                        "use a checkpoint with full attention")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or ()):
        raise UserError("config.json: `layer_types` has non-full attention layers; only full attention is "
                        "supported")


def silu_act(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"config.json: `hidden_act` {act!r} is not supported; the gated MLP here is SwiGLU (silu)")


def rope_model(hf: dict, *, tied_default: bool, eps_default: float) -> dict[str, Any]:
    """The fields Llama, Qwen2 and Qwen3 share: RoPE, RMSNorm, SwiGLU, grouped-query attention."""
    no_sliding_window(hf)
    silu_act(hf)
    n_heads = need(hf, "num_attention_heads")
    return {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False, "qkv_bias": False,
            "qk_norm": False, "d_model": need(hf, "hidden_size"), "n_layers": need(hf, "num_hidden_layers"),
            "n_heads": n_heads, "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "d_ff": need(hf, "intermediate_size"), "head_dim": hf.get("head_dim") or 0,
            "max_seq_len": hf.get("max_position_embeddings") or 2048, **rope_fields(hf),
            "norm_eps": float(hf.get("rms_norm_eps") or eps_default),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", tied_default))}


def rope_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ff_dim, "head_dim": head_dim(cfg),
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": rope_parameters(cfg),
            "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0}


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_scaling == "llama3":
        return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len}
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}


def common_misfit(cfg: ModelConfig) -> str | None:
    if cfg.moe_experts:
        return "model.moe_experts"
    if not cfg.causal:
        return "model.causal"
    return None


def rope_misfit(cfg: ModelConfig, *, qkv_bias: bool, qk_norm: bool, use_bias: bool | None) -> str | None:
    """The first key in which cfg differs from a RoPE family that has these attention extras (None: any)."""
    if cfg.positions != "rope":
        return "model.positions"
    if cfg.norm != "rmsnorm":
        return "model.norm"
    if cfg.mlp != "swiglu":
        return "model.mlp"
    if use_bias is not None and cfg.use_bias != use_bias:
        return "model.use_bias"
    if not cfg.use_bias and cfg.qkv_bias != qkv_bias:
        return "model.qkv_bias"
    if cfg.qk_norm != qk_norm:
        return "model.qk_norm"
    return common_misfit(cfg)


# ---------------------------------------------------------------------------------------------- GPT-2

def gpt2_model(hf: dict) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise UserError(f"config.json: `activation_function` {act!r} is not supported; use gelu_new or gelu")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            raise UserError(f"config.json: `{key}` is true; GPT-2 import supports the standard attention only")
    if hf.get("scale_attn_weights") is False:
        raise UserError("config.json: `scale_attn_weights` is false; GPT-2 import needs 1/sqrt(head_dim) scaling")
    d = need(hf, "n_embd")
    return {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "gelu_approximate": act != "gelu",
            "use_bias": True, "qkv_bias": False, "qk_norm": False, "d_model": d, "n_layers": need(hf, "n_layer"),
            "n_heads": need(hf, "n_head"), "n_kv_heads": 0, "head_dim": 0, "d_ff": hf.get("n_inner") or 4 * d,
            "max_seq_len": need(hf, "n_positions"), "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}


def gpt2_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ff_dim,
            "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.gelu_approximate else "gelu",
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True}


def gpt2_misfit(cfg: ModelConfig) -> str | None:
    for key, want in (("positions", "learned"), ("norm", "layernorm"), ("mlp", "gelu"), ("use_bias", True),
                      ("qk_norm", False)):
        if getattr(cfg, key) != want:
            return f"model.{key}"
    if cfg.kv_heads != cfg.n_heads:
        return "model.n_kv_heads"
    if head_dim(cfg) != cfg.d_model // cfg.n_heads:
        return "model.head_dim"
    return common_misfit(cfg)


G = "transformer.h.{i}."  # one GPT-2 layer
GPT2 = Family(
    name="gpt2", architecture="GPT2LMHeadModel", model_type="gpt2", to_model=gpt2_model, to_hf=gpt2_hf,
    misfit=gpt2_misfit, aliases=("GPT2Model",),
    tensors=(
        t("embed_VD", "transformer.wte.weight", "v d", "v d"),
        t("pos_TD", "transformer.wpe.weight", "p d", "p d"),
        t("blocks/{i}/attn_norm/scale_D", G + "ln_1.weight", "d", "d"),
        t("blocks/{i}/attn_norm/bias_D", G + "ln_1.bias", "d", "d"),
        # c_attn is Conv1D (in, out) with out = [q | k | v]: thirds c = 0, 1, 2 of the output axis.
        t("blocks/{i}/attn/wq_DNH", G + "attn.c_attn.weight", "d (c n h)", "d n h", c=0),
        t("blocks/{i}/attn/wkv_D2KH", G + "attn.c_attn.weight", "d (c k h)", "d c k h", c=1),
        t("blocks/{i}/attn/bq_NH", G + "attn.c_attn.bias", "(c n h)", "n h", c=0),
        t("blocks/{i}/attn/bkv_2KH", G + "attn.c_attn.bias", "(c k h)", "c k h", c=1),
        t("blocks/{i}/attn/wo_NHD", G + "attn.c_proj.weight", "(n h) d", "n h d"),
        t("blocks/{i}/attn/bo_D", G + "attn.c_proj.bias", "d", "d"),
        t("blocks/{i}/mlp_norm/scale_D", G + "ln_2.weight", "d", "d"),
        t("blocks/{i}/mlp_norm/bias_D", G + "ln_2.bias", "d", "d"),
        t("blocks/{i}/mlp/wi_DCF", G + "mlp.c_fc.weight", "d f", "d 1 f"),
        t("blocks/{i}/mlp/bi_CF", G + "mlp.c_fc.bias", "f", "1 f"),
        t("blocks/{i}/mlp/wo_FD", G + "mlp.c_proj.weight", "f d", "f d"),
        t("blocks/{i}/mlp/bo_D", G + "mlp.c_proj.bias", "d", "d"),
        t("final_norm/scale_D", "transformer.ln_f.weight", "d", "d"),
        t("final_norm/bias_D", "transformer.ln_f.bias", "d", "d"),
        t("head_DV", "lm_head.weight", "v d", "d v"),
    ),
)


# ---------------------------------------------------------------------------------------------- Llama, Qwen

L = "model.layers.{i}."
A = L + "self_attn."
# torch Linear weights are (out, in): q_proj (N*H, D), o_proj (D, N*H), gate/up (F, D), down (D, F).
ROPE_TENSORS = (
    t("embed_VD", "model.embed_tokens.weight", "v d", "v d"),
    t("blocks/{i}/attn_norm/scale_D", L + "input_layernorm.weight", "d", "d"),
    t("blocks/{i}/attn/wq_DNH", A + "q_proj.weight", "(n h) d", "d n h", rope=True),
    t("blocks/{i}/attn/wkv_D2KH", (A + "k_proj.weight", A + "v_proj.weight"), "(k h) d", "d s k h", rope=("s", 0)),
    t("blocks/{i}/attn/bq_NH", A + "q_proj.bias", "(n h)", "n h", rope=True),
    t("blocks/{i}/attn/bkv_2KH", (A + "k_proj.bias", A + "v_proj.bias"), "(k h)", "s k h", rope=("s", 0)),
    t("blocks/{i}/attn/wo_NHD", A + "o_proj.weight", "d (n h)", "n h d"),
    t("blocks/{i}/attn/bo_D", A + "o_proj.bias", "d", "d"),
    t("blocks/{i}/attn/scale_q_H", A + "q_norm.weight", "h", "h", rope=True),
    t("blocks/{i}/attn/scale_k_H", A + "k_norm.weight", "h", "h", rope=True),
    t("blocks/{i}/mlp_norm/scale_D", L + "post_attention_layernorm.weight", "d", "d"),
    t("blocks/{i}/mlp/wi_DCF", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), "f d", "d s f"),
    t("blocks/{i}/mlp/bi_CF", (L + "mlp.gate_proj.bias", L + "mlp.up_proj.bias"), "f", "s f"),
    t("blocks/{i}/mlp/wo_FD", L + "mlp.down_proj.weight", "d f", "f d"),
    t("blocks/{i}/mlp/bo_D", L + "mlp.down_proj.bias", "d", "d"),
    t("final_norm/scale_D", "model.norm.weight", "d", "d"),
    t("head_DV", "lm_head.weight", "v d", "d v"),
)


def llama_model(hf: dict) -> dict[str, Any]:
    fields = rope_model(hf, tied_default=False, eps_default=1e-6)
    attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if attn_bias != mlp_bias:
        raise UserError("config.json: `attention_bias` and `mlp_bias` differ; meshforge's model.use_bias puts "
                        "biases on both or neither")
    return {**fields, "use_bias": attn_bias}


def llama_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**rope_hf(cfg), "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias}


LLAMA = Family(
    name="llama", architecture="LlamaForCausalLM", model_type="llama", tensors=ROPE_TENSORS,
    to_model=llama_model, to_hf=llama_hf, aliases=("LlamaModel",),
    misfit=lambda cfg: rope_misfit(cfg, qkv_bias=False, qk_norm=False, use_bias=None),
)


def qwen2_model(hf: dict) -> dict[str, Any]:
    return {**rope_model(hf, tied_default=False, eps_default=1e-6), "qkv_bias": True}  # hard-wired in Qwen2


QWEN2 = Family(
    name="qwen2", architecture="Qwen2ForCausalLM", model_type="qwen2", tensors=ROPE_TENSORS,
    to_model=qwen2_model, aliases=("Qwen2Model",),
    to_hf=lambda cfg: {**rope_hf(cfg), "use_sliding_window": False, "sliding_window": None},
    misfit=lambda cfg: rope_misfit(cfg, qkv_bias=True, qk_norm=False, use_bias=False),
)


def qwen3_model(hf: dict) -> dict[str, Any]:
    if hf.get("attention_bias"):
        raise UserError("config.json: `attention_bias` is true; Qwen3 import supports attention without biases")
    return {**rope_model(hf, tied_default=True, eps_default=1e-6), "qk_norm": True}


QWEN3 = Family(
    name="qwen3", architecture="Qwen3ForCausalLM", model_type="qwen3", tensors=ROPE_TENSORS,
    to_model=qwen3_model, aliases=("Qwen3Model",),
    to_hf=lambda cfg: {**rope_hf(cfg), "attention_bias": False, "use_sliding_window": False,
                       "sliding_window": None},
    misfit=lambda cfg: rope_misfit(cfg, qkv_bias=False, qk_norm=True, use_bias=False),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, QWEN2, QWEN3)}


def family_of(hf: dict) -> Family:
    """The family of an HF config.json, by `architectures` (else `model_type`)."""
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in (fam.architecture, *fam.aliases) for a in archs):
            return fam
    if not archs:
        for fam in FAMILIES.values():
            if hf.get("model_type") == fam.model_type:
                return fam
    known = ", ".join(f.architecture for f in FAMILIES.values())
    what = f"`architectures` {archs}" if archs else f"`model_type` {hf.get('model_type')!r}"
    raise UserError(f"config.json: {what} is not supported; meshforge reads {known}")


def family_for_model(cfg: ModelConfig) -> Family:
    """The HF family that expresses a meshforge-native config, or a UserError naming the key none supports."""
    if cfg.positions == "learned":
        fam = GPT2
    elif cfg.qk_norm:
        fam = QWEN3
    elif cfg.qkv_bias and not cfg.use_bias:
        fam = QWEN2
    else:
        fam = LLAMA
    key = fam.misfit(cfg)
    if key:
        value = getattr(cfg, key.split(".", 1)[1])
        raise UserError(f"{key}: {value!r} fits no HF family for export (GPT-2: learned positions, layernorm, "
                        "gelu, biases; Llama/Qwen2/Qwen3: rope, rmsnorm, swiglu); export with --format hf needs "
                        "a config one of them expresses")
    return fam


def model_fields(hf: dict) -> tuple[Family, dict[str, Any]]:
    """(family, ModelConfig fields) of an HF config.json; vocab_size is padded (see real vocab in hf)."""
    fam = family_of(hf)
    fields = fam.to_model(hf)
    fields.update(vocab_size=padded_vocab(need(hf, "vocab_size")), causal=True, moe_experts=0)
    return fam, fields


def hf_config(fam: Family, cfg: ModelConfig, vocab_size: int, base: dict | None = None) -> dict[str, Any]:
    """config.json for a model of this family: `base` (an imported folder's config.json, keeping token ids and
    the like) updated with the architecture of cfg; vocab_size is the real vocabulary."""
    out = {k: v for k, v in (base or {}).items() if not k.startswith("_")}
    out.update(fam.to_hf(cfg))
    out.update(architectures=[fam.architecture], model_type=fam.model_type, vocab_size=vocab_size,
               dtype="float32" if cfg.param_dtype == "float32" else cfg.param_dtype)
    out.pop("torch_dtype", None)
    return out

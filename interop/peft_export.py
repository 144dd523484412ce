"""LoRA adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base, DIR)` loads onto the HF model the run started from.

meshforge keeps one adapter per meshforge projection (models/lora.py). The fused k/v and gate/up projections
carry one adapter per slice, which are exactly PEFT's separate k_proj/v_proj and gate_proj/up_proj adapters;
GPT-2's fused c_attn gets one wider adapter holding the q, k and v ones (see _gpt2).
PEFT stores lora_A as (rank, in) and lora_B as (out, rank) (torch Linear layout); the delta is
B A * lora_alpha / r, as in meshforge.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from interop.families import family_for_model
from models.transformer import ModelConfig
from parallel.errors import UserError

PREFIX = "base_model.model."
ATTN, MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
GPT2 = "transformer.h.{i}."


def _llama_style(name: str, wa: np.ndarray, wb: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One meshforge adapter (A, B) of one layer -> {PEFT module name: (lora_A (r, in), lora_B (out, r))}."""
    r = wa.shape[-1]
    if name == "wq_DNH":  # A (D, r), B (r, N, H)
        return {ATTN + "q_proj": (wa.T, wb.reshape(r, -1).T)}
    if name == "wkv_D2KH":  # A (D, 2, r), B (2, r, K, H)
        return {ATTN + p: (wa[:, s].T, wb[s].reshape(r, -1).T) for s, p in enumerate(("k_proj", "v_proj"))}
    if name == "wo_NHD":  # A (N, H, r), B (r, D)
        return {ATTN + "o_proj": (wa.reshape(-1, r).T, wb.T)}
    if name == "wi_DCF":  # A (D, 2, r), B (2, r, F)
        return {MLP + p: (wa[:, s].T, wb[s].T) for s, p in enumerate(("gate_proj", "up_proj"))}
    if name == "wo_FD":  # A (F, r), B (r, D)
        return {MLP + "down_proj": (wa.T, wb.T)}
    raise ValueError(name)


def _gpt2(adapters: dict[str, tuple[np.ndarray, np.ndarray]], rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One GPT-2 layer's adapters as PEFT's, for Conv1D modules (fan_in_fan_out). The fused c_attn (q | k | v)
    gets one adapter whose A stacks the q, k and v adapters' A and whose B is block-diagonal: rank r per part
    present, the same update exactly (export_peft sets its rank and alpha patterns to keep alpha / r)."""
    out = {}
    parts = []  # (A (r, D), B (D_part, r), which third of the fused output)
    if "wq_DNH" in adapters:
        wa, wb = adapters["wq_DNH"]
        parts.append((wa.T, wb.reshape(rank, -1).T, 0))
    if "wkv_D2KH" in adapters:
        wa, wb = adapters["wkv_D2KH"]
        parts += [(wa[:, s].T, wb[s].reshape(rank, -1).T, 1 + s) for s in range(2)]
    if parts:
        d = parts[0][0].shape[1]
        a = np.concatenate([p[0] for p in parts])
        b = np.zeros((3 * d, rank * len(parts)), np.float32)
        for j, (_, bj, third) in enumerate(parts):
            b[third * d:(third + 1) * d, j * rank:(j + 1) * rank] = bj
        out[GPT2 + "attn.c_attn"] = (a, b)
    if "wo_NHD" in adapters:
        wa, wb = adapters["wo_NHD"]
        out[GPT2 + "attn.c_proj"] = (wa.reshape(-1, rank).T, wb.T)
    if "wi_DCF" in adapters:
        wa, wb = adapters["wi_DCF"]
        out[GPT2 + "mlp.c_fc"] = (wa[:, 0].T, wb[0].T)
    if "wo_FD" in adapters:
        wa, wb = adapters["wo_FD"]
        out[GPT2 + "mlp.c_proj"] = (wa.T, wb.T)
    return out


def _layers(params: dict, cfg: ModelConfig) -> list[dict]:
    blocks = params["blocks"]
    if cfg.scan_layers:
        return [{m: {k: {a: v[i] for a, v in ad.items()} if isinstance(ad, dict) else ad[i]
                     for k, ad in mod.items()} for m, mod in blocks.items()} for i in range(cfg.n_layers)]
    return [blocks[i] if i in blocks else blocks[str(i)] for i in range(cfg.n_layers)]


def export_peft(params: dict, cfg: ModelConfig, out_dir: str | Path, *, base_model: str = "") -> Path:
    """Write the adapters of `params` (host arrays) for the HF family the model belongs to."""
    fam = family_for_model(cfg)
    tensors, modules, ranks = {}, set(), {}
    for i, layer in enumerate(_layers(params, cfg)):
        adapters = {key.removesuffix("_lora"): (np.asarray(ad["wa"]), np.asarray(ad["wb"]))
                    for part in ("attn", "mlp") for key, ad in layer[part].items() if key.endswith("_lora")}
        if fam.name == "gpt2":
            peft = _gpt2(adapters, cfg.lora_rank)
        else:
            peft = {m: ab for name, (wa, wb) in adapters.items() for m, ab in _llama_style(name, wa, wb).items()}
        for module, (a, b) in peft.items():
            name = PREFIX + module.format(i=i)
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a, np.float32)
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b, np.float32)
            key = module.split(".", 3)[-1] if fam.name == "gpt2" else module.rsplit(".", 1)[-1]
            modules.add(key)
            ranks[key] = a.shape[0]
    if not tensors:
        raise UserError("export --format peft: the checkpoint holds no LoRA adapters")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    # A fused module with several parts has rank r x parts; its alpha grows with it so that alpha / r is kept.
    wider = {k: r for k, r in ranks.items() if r != cfg.lora_rank}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "rank_pattern": wider, "alpha_pattern": {k: cfg.lora_alpha * r / cfg.lora_rank for k, r in wider.items()},
              "lora_dropout": cfg.lora_dropout, "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": fam.name == "gpt2", "inference_mode": True, "base_model_name_or_path": base_model}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out

"""LoRA adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base, DIR)` loads onto the HF model the run started from.

meshforge keeps one adapter per meshforge projection (models/lora.py). The fused k/v and gate/up projections
carry one adapter per slice, which are exactly PEFT's separate k_proj/v_proj and gate_proj/up_proj adapters.
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


def _layers(params: dict, cfg: ModelConfig) -> list[dict]:
    blocks = params["blocks"]
    if cfg.scan_layers:
        return [{m: {k: {a: v[i] for a, v in ad.items()} if isinstance(ad, dict) else ad[i]
                     for k, ad in mod.items()} for m, mod in blocks.items()} for i in range(cfg.n_layers)]
    return [blocks[i] if i in blocks else blocks[str(i)] for i in range(cfg.n_layers)]


def export_peft(params: dict, cfg: ModelConfig, out_dir: str | Path, *, base_model: str = "") -> Path:
    """Write the adapters of `params` (host arrays) for the HF family the model belongs to."""
    fam = family_for_model(cfg)
    if fam.name == "gpt2":
        raise UserError("export --format peft: GPT-2's fused c_attn has no per-projection PEFT adapter; use "
                        "--format hf (adapters merged)")
    tensors, modules = {}, set()
    for i, layer in enumerate(_layers(params, cfg)):
        for part in ("attn", "mlp"):
            for key, adapter in layer[part].items():
                if not key.endswith("_lora"):
                    continue
                for module, (a, b) in _llama_style(key.removesuffix("_lora"), np.asarray(adapter["wa"]),
                                                   np.asarray(adapter["wb"])).items():
                    name = PREFIX + module.format(i=i)
                    tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a, np.float32)
                    tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b, np.float32)
                    modules.add(module.rsplit(".", 1)[-1])
    if not tensors:
        raise UserError("export --format peft: the checkpoint holds no LoRA adapters")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out

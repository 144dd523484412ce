"""Tiny random HuggingFace models for the interop parity tests, built offline from transformers' config classes.

Every weight is redrawn (norm scales around 1, biases non-zero): HF's own init leaves biases at 0 and norm scales
at 1, which would hide a bias or norm that lands in the wrong place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 250  # not a multiple of 64: the import pads to 256 and export must drop the padding again
PROMPT = 576  # >= 512: a RoPE layout bug only shows at long range
BATCH = 4  # splits over data x fsdp of the 8-device mesh


def hf_config(case: str):
    """The transformers config of a named case (d_model 64, 2 layers)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    rope = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, attention_dropout=0.0)
    if case == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=640, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=VOCAB - 1,
                          eos_token_id=VOCAB - 1)
    if case in ("llama_untied", "llama_tied"):
        # theta and eps away from the defaults, so a dropped key shows
        return LlamaConfig(**rope, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                           tie_word_embeddings=case == "llama_tied")
    if case == "llama3_scaled":  # Llama 3.1's RoPE extension: with these factors all three regimes occur
        rope_parameters = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**rope, rms_norm_eps=1e-6, rope_parameters=rope_parameters, tie_word_embeddings=True)
    if case == "qwen2":
        return Qwen2Config(**rope, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if case == "qwen3":  # head_dim 32 != d_model / n_heads = 16
        return Qwen3Config(**rope, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True)
    raise ValueError(case)


CASES = ("gpt2", "llama_untied", "llama_tied", "llama3_scaled", "qwen2", "qwen3")


def randomize(model, seed: int = 0) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if ("norm" in name or ".ln_" in name) else 0.1 * noise)


def build_hf(case: str, folder: Path, seed: int = 0):
    """A random float32 model of the case, in eval mode, saved to folder (config.json + model.safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(case), dtype=torch.float32).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens_BT, dtype=torch.long)).logits.float().numpy()


def load_hf(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompt(seed: int = 0, batch: int = BATCH, length: int = PROMPT) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)

"""Text generation from a trained model: greedy, temperature and top-k sampling.

Each new token runs the model over a fixed window of the last `window` tokens (left-aligned, so causal masking
hides the unused tail): one compiled shape for the whole generation, no cache to manage. Right for the small
models this codebase trains on a laptop; a KV cache is the upgrade for long generations from large models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from train.state import ModelDef


def make_next_token(mdef: ModelDef, temperature: float, top_k: int, vocab_limit: int):
    @jax.jit
    def next_token(params, buf_BT, length, key):
        logits_BTV = mdef.apply(params, buf_BT)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, length - 1, axis=1, keepdims=False)
        # Padded vocabulary rows are never real tokens.
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
        if temperature == 0.0:
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logits_BV = logits_BV / temperature
        if top_k > 0:
            kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)

    return next_token


def generate(mdef: ModelDef, params, prompt_ids: np.ndarray, *, max_new_tokens: int, window: int,
             vocab_limit: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             num_samples: int = 1) -> np.ndarray:
    """Returns (num_samples, len(prompt) + max_new_tokens) token ids."""
    next_token = make_next_token(mdef, temperature, min(top_k, vocab_limit), vocab_limit)
    seqs = np.tile(np.asarray(prompt_ids, np.int32)[None], (num_samples, 1))
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        ctx = seqs[:, -window:]
        buf = np.zeros((num_samples, window), np.int32)
        buf[:, : ctx.shape[1]] = ctx
        key, sub = jax.random.split(key)
        tok = np.asarray(next_token(params, buf, ctx.shape[1], sub))
        seqs = np.concatenate([seqs, tok[:, None]], axis=1)
    return seqs

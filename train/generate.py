"""Text generation with a KV cache: one jitted prefill, one jitted decode loop, sharded like training.

Prompts are left-padded to a bucket length (a power of two, at least MIN_BUCKET), so a new prompt length
reuses the compiled prefill of its bucket; the cache has a bucketed number of slots too, and the number of new
tokens is an argument of the compiled loop, not a shape. The decode loop is a `lax.while_loop` that samples a
token, runs the model on it with the cache (donated, so it is updated in place), and stops when every row has
written its end-of-sequence token or the budget is spent. Greedy, temperature, top-k and top-p sampling.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.loader import process_rows
from models.transformer import cache_position, compute_dtype, init_cache
from parallel.hosts import gather
from parallel.mesh import batch_sharding, padded_rows
from parallel.rules import activate
from train.state import ModelDef

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """The power of two >= n (at least MIN_BUCKET): prompt lengths, cache slots and output widths round up to it."""
    return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("sampling: temperature must be finite and >= 0 (0: greedy), top_k >= 0, top_p in (0, 1]")


def pick(logits_BV: jax.Array, key: jax.Array, s: Sampling, vocab_limit: int) -> jax.Array:
    """The next token of each row under the sampling rule; padded vocabulary ids are never chosen."""
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
    if s.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / s.temperature
    if s.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, min(s.top_k, vocab_limit))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if s.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep a token while the probability of the tokens before it is below top_p (the first is always kept)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(before_BV < s.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def prefill_logits(mdef: ModelDef, params, tokens_BP: jax.Array, starts_B: jax.Array, cache):
    """The model over left-padded prompts (row b's prompt starts at starts_B[b]) into an empty cache: the last
    position's logits (B, V) and the filled cache. Shared by Generator and the edge export."""
    positions_BP = jnp.maximum(jnp.arange(tokens_BP.shape[1])[None, :] - starts_B[:, None], 0)
    logits_BPV, cache = mdef.apply(params, tokens_BP, positions_BT=positions_BP, cache=cache, cache_starts_B=starts_B)
    return logits_BPV[:, -1], cache


def decode_logits(mdef: ModelDef, params, tok_B: jax.Array, cache, starts_B: jax.Array):
    """One token per row, written at the cache's next slot: its logits (B, V) and the updated cache."""
    at = cache_position(cache)
    logits_B1V, cache = mdef.apply(params, tok_B[:, None], positions_BT=(at - starts_B)[:, None], cache=cache,
                                   cache_starts_B=starts_B)
    return logits_B1V[:, 0], cache


class Generator:
    """Compiled prefill and decode for one model and its parameter shardings. Call `generate`."""

    def __init__(self, mdef: ModelDef, mesh: Mesh, param_shardings, *, vocab_limit: int, eos_id: int | None,
                 cache_dtype=None):
        self.mdef, self.mesh, self.vocab_limit = mdef, mesh, vocab_limit
        self.eos = -1 if eos_id is None else int(eos_id)
        self.rows = batch_sharding(mesh)
        self.vec = NamedSharding(mesh, PartitionSpec(self.rows.spec[0]))
        cfg = mdef.cfg
        self.cache_dtype = cache_dtype or compute_dtype(cfg.dtype)

        def prefill(params, tokens_BP, starts_B, slots_like):
            cache = init_cache(cfg, tokens_BP.shape[0], slots_like.shape[0], self.cache_dtype)
            return prefill_logits(mdef, params, tokens_BP, starts_B, cache)

        self._prefill = jax.jit(prefill, in_shardings=(param_shardings, self.rows, self.vec, None))
        self._decoders: dict[Sampling, object] = {}
        self.param_shardings = param_shardings

    def _decoder(self, s: Sampling):
        if s in self._decoders:
            return self._decoders[s]
        mdef, eos, limit = self.mdef, self.eos, self.vocab_limit

        def decode(params, cache, logits_BV, starts_B, width_N, n_new, key):
            B, N = logits_BV.shape[0], width_N.shape[0]

            def cond(c):
                i, _, _, done_B, _, _ = c
                return (i < n_new) & ~jnp.all(done_B)

            def body(c):
                i, cache, logits_BV, done_B, out_BN, key = c
                key, sub = jax.random.split(key)
                tok_B = jnp.where(done_B, eos, pick(logits_BV, sub, s, limit))
                out_BN = out_BN.at[:, i].set(tok_B)
                done_B = done_B | (tok_B == eos)
                logits_BV, cache = decode_logits(mdef, params, tok_B, cache, starts_B)
                return i + 1, cache, logits_BV, done_B, out_BN, key

            init = (jnp.zeros((), jnp.int32), cache, logits_BV, jnp.zeros((B,), bool),
                    jnp.full((B, N), eos, jnp.int32), key)
            _, cache, _, _, out_BN, _ = jax.lax.while_loop(cond, body, init)
            return out_BN, cache  # returned so that the donated cache is updated in place

        # cache and logits keep the shardings prefill gave them (on a tensor axis the logits are split over the
        # vocabulary, which a batch-only `self.rows` would refuse)
        self._decoders[s] = jax.jit(decode, in_shardings=(self.param_shardings, None, None, self.vec, None, None, None),
                                    out_shardings=(self.rows, None), donate_argnums=1)
        return self._decoders[s]

    def compiles(self) -> int:
        """Programs compiled so far (prefill buckets + decode loops): the no-recompilation check counts these."""
        return self._prefill._cache_size() + sum(d._cache_size() for d in self._decoders.values())

    def generate(self, params, prompts: Sequence[np.ndarray], max_new_tokens: int, sampling: Sampling = Sampling(),
                 seed: int = 0) -> list[np.ndarray]:
        """New tokens of each prompt (cut after the end-of-sequence token, which is kept)."""
        n = len(prompts)
        if n == 0:
            raise ValueError("give at least one prompt")
        rows = padded_rows(self.mesh, n)
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise ValueError("every prompt needs at least one token")
        P = bucket(longest)
        slots = bucket(P + max_new_tokens)
        if self.mdef.cfg.positions == "learned" and longest + max_new_tokens > self.mdef.cfg.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the model's "
                             f"{self.mdef.cfg.max_seq_len} learned positions")
        tokens = np.zeros((rows, P), np.int32)
        starts = np.zeros(rows, np.int32)
        for i in range(rows):
            p = np.asarray(prompts[min(i, n - 1)], np.int32)
            tokens[i, P - len(p):], starts[i] = p, P - len(p)
        mine = process_rows(self.rows, rows)
        tokens_g = jax.make_array_from_process_local_data(self.rows, tokens[mine], tokens.shape)
        starts_g = jax.make_array_from_process_local_data(self.vec, starts[mine], starts.shape)
        with activate(self.mesh):
            logits, cache = self._prefill(params, tokens_g, starts_g, np.empty((slots, 0), np.int8))
            # the output width is a bucketed shape; the number of new tokens is a value: few decode compilations
            width = np.empty((bucket(max_new_tokens), 0), np.int8)
            out, _ = self._decoder(sampling)(params, cache, logits, starts_g, width, np.int32(max_new_tokens),
                                             jax.random.key(seed))
        out = gather(out)
        result = []
        for i in range(n):
            row = out[i, :max_new_tokens]
            stop = np.flatnonzero(row == self.eos)
            result.append(row[: stop[0] + 1] if len(stop) else row)
        return result

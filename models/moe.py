"""Sparse mixture-of-experts feed-forward block: top-k routing, expert capacity, auxiliary losses.

Shape suffixes: G groups (one batch row each), S tokens per group, D d_model, E experts, K choices per token (top-k),
C capacity (slots per expert per group), F expert hidden width, I input projections (1, or 2 for SwiGLU).

Each batch row is its own capacity group (GShard's "group"): only tokens of the same row compete for an expert's
slots, earlier tokens first. Dispatch is by index, not by one-hot einsum: a stable sort of a row's (token, choice)
assignments by expert gives each its slot, a gather fills the (E, C, D) expert buffer, the experts run as one
batched matmul, and a gather of (S, K, D) brings the outputs back. Memory is the buffer plus O(S K) indices; a
one-hot (S, E, C) dispatch tensor would be O(S^2 E) when dropless (C = S).
Only logical axis names appear here. Between the dispatch and the combine the activations are pinned to an
expert-major layout ('act_expert' on the expert mesh axis); moving from the batch-major layout to it and back is
what makes XLA emit the all-to-alls of expert parallelism.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.axes import constrain, param
from models.mlp import hidden_activation


class Routing(NamedTuple):
    experts_GSK: jax.Array  # expert of each of a token's K choices, kept or dropped (int32)
    slots_GSK: jax.Array  # its place in that expert's queue; kept when < capacity (int32)
    gates_GSK: jax.Array  # gate weight of each choice (float32)
    kept_GSK: jax.Array  # 1 where the choice found a free slot (float32)
    probs_GSE: jax.Array  # router probabilities (float32)


def capacity(tokens_per_group: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group. capacity_factor <= 0 means dropless: every token fits (C = S)."""
    if capacity_factor <= 0:
        return tokens_per_group
    return max(1, min(tokens_per_group, math.ceil(top_k * tokens_per_group * capacity_factor / n_experts)))


def top_k_choices(probs_GSE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest entries, by k argmax passes. lax.top_k would do, but XLA's SPMD
    partitioner all-gathers its operand over the batch; argmax partitions cleanly, and k is 1 or 2 here."""
    values, indices = [], []
    for _ in range(k):
        i_GS = jnp.argmax(probs_GSE, axis=-1)
        values.append(jnp.take_along_axis(probs_GSE, i_GS[..., None], axis=-1)[..., 0])
        indices.append(i_GS)
        probs_GSE = jnp.where(jax.nn.one_hot(i_GS, probs_GSE.shape[-1], dtype=jnp.bool_), -jnp.inf, probs_GSE)
    return jnp.stack(values, -1), jnp.stack(indices, -1).astype(jnp.int32)


def queue_positions(experts_N: jax.Array, n_experts: int) -> jax.Array:
    """For assignments in arrival order, how many earlier ones went to the same expert: a stable sort by expert
    keeps arrival order inside each expert, so the position in sorted order minus the expert's start is the rank.
    O(N) memory, where a one-hot running count would be O(N E)."""
    N = experts_N.shape[0]
    order_N = jnp.argsort(experts_N, stable=True)
    counts_E = jnp.zeros(n_experts, jnp.int32).at[experts_N].add(1)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_N = jnp.arange(N, dtype=jnp.int32) - starts_E[experts_N[order_N]]
    return jnp.zeros(N, jnp.int32).at[order_N].set(rank_N, unique_indices=True)


def route(logits_GSE: jax.Array, top_k: int, capacity_per_expert: int) -> Routing:
    """Top-k choices per token, then slots in token order (first come, first served) until an expert is full.

    Slots are handed out in token order, all of a token's choices before the next token's, so whether a token
    is kept never depends on later tokens: a causal language model must not see the future through capacity.
    With k > 1 the chosen gates are renormalised to sum to 1 (as Mixtral); with k = 1 the gate is the router
    probability itself, so the router still gets a gradient (as Switch).
    """
    G, S, E = logits_GSE.shape
    probs_GSE = jax.nn.softmax(logits_GSE.astype(jnp.float32), axis=-1)
    gates_GSK, experts_GSK = top_k_choices(probs_GSE, top_k)
    if top_k > 1:
        gates_GSK = gates_GSK / gates_GSK.sum(-1, keepdims=True)
    slots_GSK = jax.vmap(queue_positions, (0, None))(experts_GSK.reshape(G, S * top_k), E).reshape(G, S, top_k)
    kept_GSK = (slots_GSK < capacity_per_expert).astype(jnp.float32)
    return Routing(experts_GSK, slots_GSK, gates_GSK, kept_GSK, probs_GSE)


def dispatch(x_SD: jax.Array, experts_SK: jax.Array, slots_SK: jax.Array, n_experts: int, cap: int) -> jax.Array:
    """One row's expert buffer (E, C, D): the token in each slot, zeros in empty slots."""
    S = x_SD.shape[0]
    tokens_SK = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], slots_SK.shape)
    # S marks an empty slot; dropped assignments (slot >= C) fall outside the buffer and are discarded.
    token_EC = jnp.full((n_experts, cap), S, jnp.int32).at[experts_SK, slots_SK].set(
        tokens_SK, mode="drop", unique_indices=True)
    return jnp.take(x_SD, token_EC, axis=0, mode="fill", fill_value=0)


def combine(out_ECD: jax.Array, experts_SK: jax.Array, slots_SK: jax.Array, weights_SK: jax.Array) -> jax.Array:
    """One row's output (S, D): each token's kept expert outputs, weighted by their gates."""
    out_SKD = out_ECD.at[experts_SK, slots_SK].get(mode="fill", fill_value=0)
    return jnp.einsum("skd,sk->sd", out_SKD, weights_SK.astype(out_ECD.dtype))


def routing_stats(logits_GSE: jax.Array, r: Routing) -> dict[str, jax.Array]:
    """Auxiliary losses and load statistics of one MoE layer, as means over every token of the batch."""
    n_experts = logits_GSE.shape[-1]
    # Fraction of all (token, choice) assignments that went to each expert (before capacity): sums to 1.
    expert_frac_E = jax.nn.one_hot(r.experts_GSK, n_experts, dtype=jnp.float32).mean(axis=(0, 1, 2))
    mean_prob_E = r.probs_GSE.mean(axis=(0, 1))
    # Switch Transformer load-balancing loss: E * sum_e f_e * P_e, equal to 1 when routing is uniform.
    lb_loss = n_experts * jnp.sum(expert_frac_E * mean_prob_E)
    # ST-MoE router z-loss: keeps router logits small, which keeps the softmax numerically tame.
    z_loss = jnp.mean(jax.nn.logsumexp(logits_GSE.astype(jnp.float32), axis=-1) ** 2)
    return {"moe_lb_loss": lb_loss, "moe_z_loss": z_loss, "moe_dropped_frac": 1.0 - r.kept_GSK.mean(),
            "moe_expert_frac": expert_frac_E}


class MoEMLP(nnx.Module):
    """E expert MLPs (GELU or SwiGLU) behind a float32 router; a drop-in for models.mlp.MLP that also returns
    its routing statistics. A dropped assignment contributes nothing: the residual stream carries the token."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        *,
        top_k: int,
        capacity_factor: float,
        kind: Literal["gelu", "swiglu"],
        gelu_approximate: bool,
        init_std: float,
        out_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"model.moe_top_k must be in [1, {n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.kind, self.gelu_approximate, self.dtype = kind, gelu_approximate, dtype
        init = jax.nn.initializers.normal(init_std)
        n_in = 2 if kind == "swiglu" else 1
        # The router's expert axis stays whole on every device: each token needs all E logits.
        self.w_router_DE = param(rngs, init, (d_model, n_experts), ("embed", None), param_dtype)
        self.wi_EDIF = param(rngs, init, (n_experts, d_model, n_in, d_ff), ("expert", "embed", None, "mlp"),
                             param_dtype)
        self.wo_EFD = param(rngs, jax.nn.initializers.normal(out_std), (n_experts, d_ff, d_model),
                            ("expert", "mlp", "embed"), param_dtype)

    def __call__(self, x_GSD: jax.Array, dropless: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        dt = self.dtype
        G, S, D = x_GSD.shape
        x_GSD = constrain(x_GSD, ("batch", "length", "act_embed"))
        # Routing decisions in float32: bfloat16 logits flip near-tied top-k choices.
        logits_GSE = jnp.einsum("gsd,de->gse", x_GSD.astype(jnp.float32), self.w_router_DE[...].astype(jnp.float32))
        # dropless (generation): a prompt's left padding must not take slots from its real tokens
        cap = capacity(S, self.n_experts, self.top_k, 0.0 if dropless else self.capacity_factor)
        r = route(logits_GSE, self.top_k, cap)

        in_GECD = jax.vmap(dispatch, (0, 0, 0, None, None))(x_GSD.astype(dt), r.experts_GSK, r.slots_GSK,
                                                             self.n_experts, cap)
        # Batch-major -> expert-major: the all-to-all that sends each expert its tokens.
        in_GECD = constrain(in_GECD, ("expert_group", "act_expert", None, "act_embed"))
        h_GECIF = jnp.einsum("gecd,edif->gecif", in_GECD, self.wi_EDIF[...].astype(dt))
        h_GECF = hidden_activation(h_GECIF[..., 0, :], h_GECIF[..., 1, :] if self.kind == "swiglu" else None, self.kind,
                          self.gelu_approximate)
        h_GECF = constrain(h_GECF, ("expert_group", "act_expert", None, "act_mlp"))
        out_GECD = jnp.einsum("gecf,efd->gecd", h_GECF, self.wo_EFD[...].astype(dt))
        out_GECD = constrain(out_GECD, ("expert_group", "act_expert", None, "act_embed"))
        # Expert-major -> batch-major: the all-to-all that brings the outputs home.
        out_GECD = constrain(out_GECD, ("batch", None, None, "act_embed"))
        y_GSD = jax.vmap(combine)(out_GECD, r.experts_GSK, r.slots_GSK, r.gates_GSK * r.kept_GSK)
        return y_GSD, routing_stats(logits_GSE, r)

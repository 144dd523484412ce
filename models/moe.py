"""Sparse mixture-of-experts feed-forward block: top-k routing, expert capacity, auxiliary losses.

Shape suffixes: G groups (one sequence each), S tokens per group, D d_model, E experts, K choices per token (top-k),
C capacity (slots per expert per group), F expert hidden width, I input projections (1, or 2 for SwiGLU).

Dispatch follows GShard/Switch: a one-hot (G, S, E, C) tensor moves each kept token into its expert's slot with
one einsum, the experts run as one batched matmul, and a weighted (G, S, E, C) tensor combines their outputs.
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
    dispatch_GSEC: jax.Array  # 1 where token s of group g sits in slot c of expert e
    combine_GSEC: jax.Array  # the gate weight of that assignment, 0 elsewhere (dropped assignments included)
    probs_GSE: jax.Array  # router probabilities (float32)
    chosen_GSKE: jax.Array  # one-hot expert of each of a token's K choices, kept or dropped
    kept_GSK: jax.Array  # 1 where the choice found a free slot


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
    chosen_GSKE = jax.nn.one_hot(experts_GSK, E, dtype=jnp.int32)
    # Running count of earlier assignments to the same expert, over (token, choice) in order.
    order_NE = chosen_GSKE.reshape(G, S * top_k, E)
    slot_GSK = ((jnp.cumsum(order_NE, axis=1) - 1) * order_NE).sum(-1).reshape(G, S, top_k)
    kept_GSK = slot_GSK < capacity_per_expert
    slot_GSKC = jax.nn.one_hot(slot_GSK, capacity_per_expert, dtype=jnp.float32) * kept_GSK[..., None]
    chosen_f = chosen_GSKE.astype(jnp.float32)
    dispatch_GSEC = jnp.einsum("gske,gskc->gsec", chosen_f, slot_GSKC)
    combine_GSEC = jnp.einsum("gske,gskc,gsk->gsec", chosen_f, slot_GSKC, gates_GSK)
    return Routing(dispatch_GSEC, combine_GSEC, probs_GSE, chosen_GSKE, kept_GSK.astype(jnp.float32))


def routing_stats(logits_GSE: jax.Array, r: Routing) -> dict[str, jax.Array]:
    """Auxiliary losses and load statistics of one MoE layer, as means over every token of the batch."""
    n_experts = logits_GSE.shape[-1]
    # Fraction of all (token, choice) assignments that went to each expert (before capacity): sums to 1.
    expert_frac_E = r.chosen_GSKE.astype(jnp.float32).mean(axis=(0, 1, 2))
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

    def __call__(self, x_GSD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        dt = self.dtype
        G, S, D = x_GSD.shape
        x_GSD = constrain(x_GSD, ("batch", "length", "act_embed"))
        # Routing decisions in float32: bfloat16 logits flip near-tied top-k choices.
        logits_GSE = jnp.einsum("gsd,de->gse", x_GSD.astype(jnp.float32), self.w_router_DE[...].astype(jnp.float32))
        r = route(logits_GSE, self.top_k, capacity(S, self.n_experts, self.top_k, self.capacity_factor))

        # Batch-major -> expert-major: the all-to-all that sends each expert its tokens.
        in_GECD = jnp.einsum("gsd,gsec->gecd", x_GSD.astype(dt), r.dispatch_GSEC.astype(dt))
        in_GECD = constrain(in_GECD, ("expert_group", "act_expert", None, "act_embed"))
        h_GECIF = jnp.einsum("gecd,edif->gecif", in_GECD, self.wi_EDIF[...].astype(dt))
        h_GECF = hidden_activation(h_GECIF[..., 0, :], h_GECIF[..., 1, :] if self.kind == "swiglu" else None, self.kind,
                          self.gelu_approximate)
        h_GECF = constrain(h_GECF, ("expert_group", "act_expert", None, "act_mlp"))
        out_GECD = jnp.einsum("gecf,efd->gecd", h_GECF, self.wo_EFD[...].astype(dt))
        out_GECD = constrain(out_GECD, ("expert_group", "act_expert", None, "act_embed"))
        # Expert-major -> batch-major: the all-to-all that brings the outputs home.
        out_GECD = constrain(out_GECD, ("batch", None, None, "act_embed"))
        y_GSD = jnp.einsum("gecd,gsec->gsd", out_GECD, r.combine_GSEC.astype(dt))
        return y_GSD, routing_stats(logits_GSE, r)

"""Softmax cross-entropy from the final hidden states, a chunk of tokens at a time.

At a large vocabulary the float32 (B, T, V) logits are the largest array of a step (8 x 2048 tokens x 128k
entries = 8 GiB), and the plain form keeps them, and their gradient, alive at once. Here only one chunk of
positions has logits at a time: a scan over chunks that computes each chunk's loss *and* its gradients in the
same pass (a custom VJP), so the backward pass neither stores nor recomputes any logits. With one chunk it is
the plain computation, left to autodiff.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.axes import constrain, shards
from models.dense import dense


def head_logits(x_BTD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """Float32 logits of the output head (the transposed embedding when tied), whatever the compute dtype."""
    logits_BTV = dense(x_BTD, head_DV.astype(x_BTD.dtype), 1, jnp.float32)
    return constrain(logits_BTV, ("batch", "length", "act_vocab"))


def _token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss per token, logsumexp, one-hot of the targets). The target's logit comes from a compare-and-sum, not a
    gather: with the vocabulary split over tensor-parallel devices each sums its part, nothing is gathered."""
    hit_BTV = jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype) == targets_BT[..., None]
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    return lse_BT - jnp.where(hit_BTV, logits_BTV, 0.0).sum(-1), lse_BT, hit_BTV


def chunk_length(T: int, rows: int, chunk_tokens: int) -> int:
    """Positions per chunk so that a device's chunk holds about chunk_tokens tokens of its `rows` rows."""
    return max(1, min(T, chunk_tokens // max(rows, 1)))


def cross_entropy_sums(x_BTD: jax.Array, head_DV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, *,
                       chunk_tokens: int, per_row: bool = False) -> tuple[jax.Array, ...]:
    """(sum of weighted token losses, sum of weights), float32; divide once, after all sums are in.

    chunk_tokens bounds the tokens per device whose logits exist at once. Chunks run along the length axis, so
    every chunk keeps the batch's sharding; a last partial chunk is padded with weight 0. per_row (evaluation:
    no gradient rule) adds a third output, each row's sum of weighted token losses (B,), from the same pass; the
    total is computed as without it.
    """
    weights_BT = weights_BT.astype(jnp.float32)
    B, T, _ = x_BTD.shape
    c = chunk_length(T, math.ceil(B / shards("batch")), chunk_tokens)
    if c >= T:
        losses_BT = _token_losses(head_logits(x_BTD, head_DV), targets_BT)[0]
        rows = ((losses_BT * weights_BT).sum(1),) if per_row else ()
        return (losses_BT * weights_BT).sum(), weights_BT.sum(), *rows
    if per_row:
        total, rows_B = _scan(x_BTD, head_DV, targets_BT, weights_BT, c, grads=False, per_row=True)
        return total, weights_BT.sum(), rows_B
    return _chunked_sum(x_BTD, head_DV, targets_BT, weights_BT, c), weights_BT.sum()


def _chunked_sum(x_BTD, head_DV, targets_BT, weights_BT, c: int) -> jax.Array:
    @jax.custom_vjp
    def loss_sum(x_BTD, head_DV, targets_BT, weights_BT):
        return _scan(x_BTD, head_DV, targets_BT, weights_BT, c, grads=False)[0]

    def fwd(x_BTD, head_DV, targets_BT, weights_BT):
        total, dx_BTD, dhead_DV, losses_BT = _scan(x_BTD, head_DV, targets_BT, weights_BT, c, grads=True)
        return total, (dx_BTD, dhead_DV.astype(head_DV.dtype), losses_BT)

    def bwd(res, g):
        dx_BTD, dhead_DV, losses_BT = res
        return ((g * dx_BTD).astype(dx_BTD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, g * losses_BT)

    loss_sum.defvjp(fwd, bwd)
    return loss_sum(x_BTD, head_DV, targets_BT, weights_BT)


def _scan(x_BTD, head_DV, targets_BT, weights_BT, c: int, *, grads: bool, per_row: bool = False):
    """Loss sum over chunks of c positions; with grads, also d(sum)/dx, d(sum)/dhead and each token's loss; with
    per_row (and no grads), also each row's loss sum."""
    B, T, D = x_BTD.shape
    V = head_DV.shape[1]
    n = math.ceil(T / c)
    pad = ((0, 0), (0, n * c - T))
    dt = x_BTD.dtype
    # Gathered once here (FSDP), not once per chunk inside the loop.
    head_DV = constrain(head_DV.astype(dt), (None, "vocab"))
    # d(sum)/dhead is summed over tokens, so over the batch's devices: each accumulates its own partial sum in
    # its slice of a leading S axis and one reduction follows the loop. A (D, V) carry instead would make XLA
    # all-reduce the whole head gradient after every chunk.
    S = shards("batch") if B % shards("batch") == 0 else 1

    def chunks(a):  # (B, T, ...) -> (n, B, c, ...), padded with zeros (weight 0)
        a = jnp.pad(a, (*pad, *[(0, 0)] * (a.ndim - 2)))
        return jnp.moveaxis(a.reshape(B, n, c, *a.shape[2:]), 1, 0)

    def body(carry, xs):
        total, rows_B, dhead_SDV = carry  # rows_B: each row's sum with per_row, else None
        x_BcD, t_Bc, w_Bc = xs
        x_BcD = constrain(x_BcD, ("batch", "length", "act_embed"))
        logits_BcV = head_logits(x_BcD, head_DV)
        losses_Bc, lse_Bc, hit_BcV = _token_losses(logits_BcV, t_Bc)
        total = total + (losses_Bc * w_Bc).sum()
        if per_row:
            rows_B = rows_B + (losses_Bc * w_Bc).sum(1)
        if not grads:
            return (total, rows_B, dhead_SDV), None
        # d(loss)/d(logits) = (softmax - one-hot) * weight, kept in float32 for the two matmuls below, as autodiff
        # of the plain form does (its transposed dots take the float32 cotangent as it is)
        dlogits_BcV = (jnp.exp(logits_BcV - lse_Bc[..., None]) - hit_BcV) * w_Bc[..., None]
        dx_BcD = jnp.einsum("bcv,dv->bcd", dlogits_BcV, head_DV, preferred_element_type=jnp.float32).astype(dt)
        dhead_SDV = dhead_SDV + jnp.einsum("sbcd,sbcv->sdv", x_BcD.reshape(S, B // S, c, D),
                                           dlogits_BcV.reshape(S, B // S, c, V), preferred_element_type=jnp.float32)
        dhead_SDV = constrain(dhead_SDV, ("batch", "act_embed", "act_vocab"))
        return (total, rows_B, dhead_SDV), (dx_BcD, losses_Bc)

    dhead_SDV = constrain(jnp.zeros((S, D, V), jnp.float32), ("batch", "act_embed", "act_vocab")) if grads else None
    rows_B = jnp.zeros((B,), jnp.float32) if per_row else None
    (total, rows_B, dhead_SDV), ys = jax.lax.scan(body, (jnp.zeros((), jnp.float32), rows_B, dhead_SDV),
                                                  (chunks(x_BTD), chunks(targets_BT), chunks(weights_BT)))
    if not grads:
        return (total, rows_B) if per_row else (total,)

    def unchunk(a):  # (n, B, c, ...) -> (B, T, ...)
        return jnp.moveaxis(a, 0, 1).reshape(B, n * c, *a.shape[3:])[:, :T]

    return total, unchunk(ys[0]), dhead_SDV.sum(0), unchunk(ys[1])

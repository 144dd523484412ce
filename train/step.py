"""The jitted train and eval steps: weighted loss sums, accumulation, optimizer update, metrics."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from models.loss import cross_entropy_sums
from optim.chains import accumulate_gradients, nonfinite_counts, schedule_count
from optim.prune import prune_metrics
from optim.trainable import combine, select
from train.diagnostics import layout, step_diagnostics
from train.state import ModelDef, State


def _forward_sums(mdef: ModelDef, params, batch, dropout_key, act_stats: bool = False, per_row: bool = False):
    """(loss sum, weight sum, aux): aux holds the model's MoE statistics and weighted `aux_loss` ({} if dense),
    and with act_stats each layer's output mean square `act_ms` (diagnostics). per_row (evaluation) inserts each
    row's loss sum (B,) before aux.

    The model stops at its final hidden states and the loss makes the logits a chunk at a time (models/loss.py):
    float32 (B, T, V) logits never exist at once at a large vocabulary.
    """
    model = mdef.module(params)
    x_BTD, aux = model(batch["inputs"], segment_ids_BT=batch.get("segment_ids"), positions_BT=batch.get("positions"),
                       dropout_key=dropout_key, return_aux=True, return_hidden=True, act_stats=act_stats)
    sums = cross_entropy_sums(x_BTD, model.head_weights(), batch["targets"], batch["weights"],
                              chunk_tokens=mdef.cfg.loss_chunk_tokens, per_row=per_row)
    return (*sums, aux)


def train_step_fn(mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *, accum_steps: int,
                  seed: int, param_shardings: dict, diagnostics: int = 0) -> Callable:
    """The unjitted step (state, batch, replica=None, anchor=None, prox_mu=0) -> (state, metrics).

    diagnostics (log.diagnostics_every): with k > 0, metrics['diag'] holds the packed vector of
    train/diagnostics.py on steps whose number (after the step) is a multiple of k, zeros on the others; with 0
    none of it is traced.

    train/rounds.py maps it over replicas: `replica` (a traced index) gives each its own dropout stream, and
    FedProx adds prox_mu (params - anchor) to the gradient (the gradient of prox_mu/2 ||params - anchor||^2)."""
    use_dropout = mdef.cfg.dropout > 0 or (mdef.cfg.lora_rank > 0 and mdef.cfg.lora_dropout > 0)

    def loss_sums(params, batch, key):
        ce_sum, weight_sum, aux = _forward_sums(mdef, params, batch, key if use_dropout else None, diagnostics > 0)
        sums = {"ce": ce_sum}
        if diagnostics:  # token-weighted like the MoE statistics below: accumulation gives the weighted mean
            sums["act_ms"] = aux.pop("act_ms") * weight_sum
        if "aux_loss" in aux:
            # MoE aux losses are means over this micro-batch; scaled by its token weight they join the sums, so
            # the one division by the total weight gives their weighted mean, however the batch is split.
            aux = {("moe_aux_loss" if k == "aux_loss" else k): v * weight_sum for k, v in aux.items()}
            sums.update(aux)
            return ce_sum + aux["moe_aux_loss"], (weight_sum, sums)
        return ce_sum, (weight_sum, sums)

    mask = mdef.trainable  # frozen parameters get no gradient, no optimizer state, no update
    lay = layout(mdef.cfg, mdef.param_shapes(), mdef.logical_axes(), mask) if diagnostics else None

    def train_step(state: State, batch: dict, replica=None, anchor=None, prox_mu: float = 0.0
                   ) -> tuple[State, dict]:
        # Dropout's own stream: nnx.Rngs(params=seed) draws init keys as fold_in(key(seed), i), i = 0, 1, ...,
        # so fold_in(key(seed), step) would reuse them. 0x64726F70 ("drop") is far past any count of init keys.
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x64726F70), state["step"])
        if replica is not None:
            key = jax.random.fold_in(key, replica)
        trained = select(state["params"], mask)
        sums_of = lambda t, b, k: loss_sums(combine(state["params"], t, mask), b, k)  # noqa: E731
        _, weight_sum, sums, grad_sums = accumulate_gradients(sums_of, trained, batch, accum_steps, key)
        # Gradients take their parameter's layout at once: with FSDP the batch-sharded partial sums become a
        # reduce-scatter, and clipping's norm is computed on shards instead of a replicated copy.
        grad_sums = jax.lax.with_sharding_constraint(grad_sums, select(param_shardings, mask))
        denom = jnp.maximum(weight_sum, 1.0)
        # (in the parameters' dtype: with bfloat16 parameters the optimizer state must keep its dtype)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sums, trained)
        if prox_mu:
            grads = jax.tree.map(lambda g, p, a: (g + prox_mu * (p - a)).astype(p.dtype), grads, trained, anchor)
        updates, opt_state = tx.update(grads, state["opt_state"], trained)
        params = combine(state["params"], optax.apply_updates(trained, updates), mask)
        in_a_row, skipped = nonfinite_counts(opt_state)
        # The lr this update applied: the schedule counts applied updates, so it does not advance on a skipped step.
        lr = schedule(schedule_count(state["opt_state"]))
        metrics = {"loss": sums.pop("ce") / denom, "grad_norm": optax.tree.norm(grads), "lr": lr,
                   "tokens": weight_sum, "skipped_steps": skipped, "nonfinite_in_a_row": in_a_row,
                   **{k: v / denom for k, v in sums.items()}, **prune_metrics(opt_state)}
        if diagnostics:
            act_ms = metrics.pop("act_ms")  # the forward pass's part is cheap (L means): every step computes it
            packed = lambda: step_diagnostics(lay, grads, updates, trained, act_ms)  # noqa: E731
            # Three more passes over the parameters (a few % of a small model's CPU step: README, Training
            # diagnostics), so only the steps that are logged make them.
            metrics["diag"] = packed() if diagnostics == 1 else jax.lax.cond(
                (state["step"] + 1) % diagnostics == 0, packed, lambda: jnp.zeros(len(lay.names()), jnp.float32))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_train_step(mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    accum_steps: int, seed: int, state_shardings: State, batch_sharding: NamedSharding,
                    flags_sharding: NamedSharding | None = None, diagnostics: int = 0) -> Callable:
    """The jitted step (state, batch) -> (state, metrics). With flags_sharding it takes a third argument, the
    host flags of parallel.hosts.StepFlags (a row per device, or one replicated row in a single process), and
    returns their max over the rows as metrics['flags']: every process reads the same decision from the same
    step, without a host round trip."""
    train_step = train_step_fn(mdef, tx, schedule, accum_steps=accum_steps, seed=seed,
                               param_shardings=state_shardings["params"], diagnostics=diagnostics)
    if flags_sharding is None:
        return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)

    def train_step_with_flags(state: State, batch: dict, flags_DF: jax.Array) -> tuple[State, dict]:
        state, metrics = train_step(state, batch)
        return state, {**metrics, "flags": flags_DF.max(0)}

    return jax.jit(train_step_with_flags, in_shardings=(state_shardings, batch_sharding, flags_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(mdef: ModelDef, param_shardings: dict, batch_sharding: NamedSharding,
                   n_sources: int = 0) -> Callable:
    """(params, batch) -> (loss sum, weight sum). With n_sources > 0: (params, batch, source_B) -> also each
    source's loss and weight sums (n_sources,), source_B holding each row's source index: the overall and every
    per-source loss from one pass over the validation data, and the overall sums computed as without sources."""
    if not n_sources:
        def eval_step(params, batch):
            return _forward_sums(mdef, params, batch, None)[:2]

        return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))

    def eval_step_by_source(params, batch, source_B):
        loss, weight, loss_B, _ = _forward_sums(mdef, params, batch, None, per_row=True)
        weight_B = batch["weights"].astype(jnp.float32).sum(1)
        # a masked sum over the (sharded) rows: one all-reduce of n_sources values, exact float32 adds
        in_source_BK = source_B[:, None] == jnp.arange(n_sources)
        return (loss, weight, jnp.where(in_source_BK, loss_B[:, None], 0.0).sum(0),
                jnp.where(in_source_BK, weight_B[:, None], 0.0).sum(0))

    rows = NamedSharding(batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0]))  # (B,): the rows' axes
    return jax.jit(eval_step_by_source, in_shardings=(param_shardings, batch_sharding, rows))

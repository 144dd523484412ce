"""The jitted train and eval steps: weighted loss sums, accumulation, optimizer update, metrics."""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from optim.chains import accumulate_gradients, nonfinite_counts
from train.state import ModelDef, State


def cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array):
    """(sum of weighted token losses, sum of weights), in float32. Divide once, after all sums are in."""
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    weights_BT = weights_BT.astype(jnp.float32)
    return (losses_BT * weights_BT).sum(), weights_BT.sum()


def _forward_sums(mdef: ModelDef, params, batch, dropout_key):
    """(loss sum, weight sum, aux): aux holds the model's MoE statistics and weighted `aux_loss` ({} if dense)."""
    logits_BTV, aux = mdef.apply(params, batch["inputs"], segment_ids_BT=batch.get("segment_ids"),
                                 positions_BT=batch.get("positions"), dropout_key=dropout_key, return_aux=True)
    return (*cross_entropy_sums(logits_BTV, batch["targets"], batch["weights"]), aux)


def make_train_step(mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    accum_steps: int, seed: int, state_shardings: State, batch_sharding: NamedSharding) -> Callable:
    use_dropout = mdef.cfg.dropout > 0

    def loss_sums(params, batch, key):
        ce_sum, weight_sum, aux = _forward_sums(mdef, params, batch, key if use_dropout else None)
        sums = {"ce": ce_sum}
        if "aux_loss" in aux:
            # MoE aux losses are means over this micro-batch; scaled by its token weight they join the sums, so
            # the one division by the total weight gives their weighted mean, however the batch is split.
            aux = {("moe_aux_loss" if k == "aux_loss" else k): v * weight_sum for k, v in aux.items()}
            sums.update(aux)
            return ce_sum + aux["moe_aux_loss"], (weight_sum, sums)
        return ce_sum, (weight_sum, sums)

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        _, weight_sum, sums, grad_sums = accumulate_gradients(loss_sums, state["params"], batch, accum_steps, key)
        # Gradients take their parameter's layout at once: with FSDP the batch-sharded partial sums become a
        # reduce-scatter, and clipping's norm is computed on shards instead of a replicated copy.
        grad_sums = jax.lax.with_sharding_constraint(grad_sums, state_shardings["params"])
        denom = jnp.maximum(weight_sum, 1.0)
        # (in the parameters' dtype: with bfloat16 parameters the optimizer state must keep its dtype)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sums, state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        in_a_row, skipped = nonfinite_counts(opt_state)
        metrics = {"loss": sums.pop("ce") / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   "tokens": weight_sum, "skipped_steps": skipped, "nonfinite_in_a_row": in_a_row,
                   **{k: v / denom for k, v in sums.items()}}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(mdef: ModelDef, param_shardings: dict, batch_sharding: NamedSharding) -> Callable:
    def eval_step(params, batch):
        return _forward_sums(mdef, params, batch, None)[:2]

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))

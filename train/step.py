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
    logits_BTV = mdef.apply(params, batch["inputs"], segment_ids_BT=batch.get("segment_ids"),
                            positions_BT=batch.get("positions"), dropout_key=dropout_key)
    return cross_entropy_sums(logits_BTV, batch["targets"], batch["weights"])


def make_train_step(mdef: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    accum_steps: int, seed: int, state_shardings: State, batch_sharding: NamedSharding) -> Callable:
    use_dropout = mdef.cfg.dropout > 0

    def loss_sums(params, batch, key):
        loss_sum, weight_sum = _forward_sums(mdef, params, batch, key if use_dropout else None)
        return loss_sum, (weight_sum, {})

    def train_step(state: State, batch: dict) -> tuple[State, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        loss_sum, weight_sum, _, grad_sums = accumulate_gradients(loss_sums, state["params"], batch, accum_steps, key)
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sums)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        in_a_row, skipped = nonfinite_counts(opt_state)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   "tokens": weight_sum, "skipped_steps": skipped, "nonfinite_in_a_row": in_a_row}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(mdef: ModelDef, param_shardings: dict, batch_sharding: NamedSharding) -> Callable:
    def eval_step(params, batch):
        return _forward_sums(mdef, params, batch, None)

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))

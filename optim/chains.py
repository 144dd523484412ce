"""Optimizers as Optax chains, built from the `optim` config section alone.

clip (global norm) -> AdamW or LAMB (decoupled weight decay under a mask) -> learning-rate schedule.
Gradient accumulation lives here too: micro-batches are scanned inside the one jitted step, their *sums* of
loss, weight and gradient are added, and the division by the total weight happens once, so the update does not
depend on how the batch is split.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from models.axes import PROJECTIONS, n_stacked, path_name
from optim.prune import PruneConfig, prune
from parallel.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    # sgd: heavy-ball momentum b1 (0: plain SGD) with weight decay added to the gradient; the inner optimizer of
    # local SGD / FedAvg (outer section), where averaging replicas equals synchronous training (it is linear)
    name: Literal["adamw", "lamb", "sgd"] = "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # embeddings (and the tied head) are not decayed by default
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: decay over the whole run (train.steps)
    min_lr_ratio: float = 0.1  # cosine/linear end at lr * min_lr_ratio
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    accum_steps: int = 1  # micro-batches per optimizer step
    moment_dtype: Literal["float32", "bfloat16"] = "float32"  # storage of the Adam/LAMB moments (math in float32)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.accum_steps < 1:
            raise ValueError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if self.warmup_steps < 0 or self.clip_norm < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.clip_norm and optim.weight_decay must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    end = cfg.lr * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps - cfg.warmup_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps - cfg.warmup_steps)
    else:
        main = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


# Weight matrices are named w*/head_*; embeddings embed_*/pos_*; norms and biases (scale_*, bias_*, b*) are
# never decayed. A name outside these patterns is an error, so a new parameter cannot silently escape the rule.
_MATRIX = re.compile(r"^(w|head_)")
_EMBEDDING = re.compile(r"^(embed_|pos_)")
_NO_DECAY = re.compile(r"^(scale_|bias_|b[a-z]*_)")


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """A pytree of bools: True where weight decay applies."""

    def leaf(path, _):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if _MATRIX.match(name):
            return True
        if _EMBEDDING.match(name):
            return decay_embeddings
        if _NO_DECAY.match(name):
            return False
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} matches no weight-decay rule in optim/chains.py")

    return jax.tree_util.tree_map_with_path(leaf, params)


def mup_lr_multipliers(params: Any, width_mult: float) -> Any:
    """A pytree of floats like `params`: muP's factor on each parameter's Adam update (Tensor Programs V, Table 3).

    The hidden matrices, whose fan-in grows with the width (attention q/k/v/o, MLP in/out: models.axes.PROJECTIONS),
    get 1/width_mult: Adam's update has O(1) entries whatever the gradient's scale, so a matrix of fan-in n moves
    its output by ~lr * n, and lr / width_mult keeps that fixed. Embeddings, the readout (its 1/width_mult
    multiplier in the forward pass does that job) and vectors (norm scales, biases) keep the lr. A name outside
    these rules is an error, as in decay_mask.
    """

    def leaf(path, _):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if re.search(PROJECTIONS, "/" + path_name(path)):
            return 1.0 / width_mult
        if _EMBEDDING.match(name) or _NO_DECAY.match(name) or name.startswith("head_"):
            return 1.0
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} matches no muP learning-rate rule in optim/chains.py")

    return jax.tree_util.tree_map_with_path(leaf, params)


def scale_by_multipliers(multipliers: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Multiply each update leaf by a constant: `multipliers(updates)` gives a pytree of floats like the updates
    (computed at trace time from the leaves' paths, so nothing is stored in the state)."""

    def update_fn(updates, state, params=None):
        scaled = jax.tree.map(lambda u, m: u if m == 1.0 else (u * m).astype(u.dtype), updates, multipliers(updates))
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def stored_as(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`tx` with its floating-point state kept in `dtype` between steps and upcast to float32 for the update.

    Halves optimizer memory with bfloat16 moments while the arithmetic stays float32 (optax's own `mu_dtype`
    covers only Adam's first moment). The state keeps tx's structure, so shardings still follow the params.
    """

    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(tx.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def stacked_dims(logical_axes: Any) -> Any:
    """Per leaf of a pytree of logical-axis tuples, how many leading axes stack independent tensors (a scanned
    model's layers, an MoE block's experts: models.axes.STACKED). LAMB's trust ratio belongs to each tensor, so it
    is taken per slice over these axes."""
    return jax.tree.map(n_stacked, logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def scale_by_stacked_trust_ratio(stacked: Any) -> optax.GradientTransformation:
    """optax.scale_by_trust_ratio with one ratio per slice over each leaf's first `stacked` axes (a pytree of ints
    like the params), so a scanned (L, ...) leaf or an (E, ...) expert leaf updates as L or E separate tensors."""

    def scale(update, param, n: int):
        axes = tuple(range(n, update.ndim))
        # Norms in float32 whatever the parameters' dtype: a bfloat16 sum of squares loses the ratio.
        p_norm = jnp.sqrt(jnp.sum(jnp.square(param.astype(jnp.float32)), axis=axes, keepdims=True))
        u_norm = jnp.sqrt(jnp.sum(jnp.square(update.astype(jnp.float32)), axis=axes, keepdims=True))
        # A zero tensor (fresh bias) or a zero update keeps ratio 1, as in the LAMB paper and optax.
        ratio = jnp.where((p_norm == 0) | (u_norm == 0), 1.0, p_norm / jnp.where(u_norm == 0, 1.0, u_norm))
        return (update * ratio).astype(update.dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_stacked_trust_ratio needs the params (LAMB's trust ratio is ||p|| / ||u||)")
        return jax.tree.map(scale, updates, params, stacked), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def build_optimizer(cfg: OptimConfig, total_steps: int, logical_axes: Any = None,
                    pruning: PruneConfig | None = None, mup_width_mult: float | None = None,
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The whole chain and its schedule. `logical_axes` (ModelDef.logical_axes(): one tuple of names per param)
    tells LAMB which leading axes stack layers or experts; LAMB refuses to build without it, since a per-leaf
    trust ratio would silently be shared by all layers of a scanned model. AdamW does not need it. `pruning`
    (the `prune` section) wraps clipping and the optimizer in optim.prune, which needs the logical axes too.
    `mup_width_mult` (ModelConfig.width_mult of a model.parametrization mup model; None: standard) scales the
    AdamW update of each parameter by mup_lr_multipliers, weight decay included: decoupled AdamW decays by
    lr * weight_decay, so a hidden matrix decays by lr / width_mult * weight_decay, as PyTorch's AdamW does under
    the mup package's per-group lr."""
    check_mup_optimizer(cfg, mup_width_mult)
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.decay_embeddings)  # noqa: E731
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "sgd":
        core = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                           optax.sgd(schedule, momentum=cfg.b1 or None))
    else:
        if logical_axes is None:
            raise ValueError("build_optimizer: LAMB needs the parameters' logical axes (ModelDef.logical_axes()) "
                             "to give each stacked layer and expert its own trust ratio")
        # optax.lamb's chain, with the trust ratio taken per stacked slice (same state structure as optax.lamb).
        core = optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                           optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                           scale_by_stacked_trust_ratio(stacked_dims(logical_axes)),
                           optax.scale_by_learning_rate(schedule))
    if mup_width_mult is not None:
        core = optax.chain(core, scale_by_multipliers(lambda tree: mup_lr_multipliers(tree, mup_width_mult)))
    if cfg.moment_dtype != "float32":
        core = stored_as(core, jnp.dtype(cfg.moment_dtype))
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    chain = optax.chain(clip, core)
    if pruning is not None and pruning.method != "none":
        if logical_axes is None:
            raise ValueError("build_optimizer: pruning needs the parameters' logical axes (ModelDef.logical_axes())")
        chain = prune(chain, pruning, logical_axes, total_steps)
    # A step whose gradients hold a NaN or Inf leaves parameters, moments and masks untouched; the state counts
    # such steps (`nonfinite_counts`). The training loop decides when too many in a row means stop.
    return optax.apply_if_finite(chain, max_consecutive_errors=2**30), schedule


def check_mup_optimizer(cfg: OptimConfig, mup_width_mult: float | None) -> None:
    """muP's per-layer rule is derived here for Adam only. LAMB's trust ratio already sets each tensor's step
    from its norm (under muP's init that gives hidden matrices lr / sqrt(width_mult), not lr / width_mult), and
    SGD needs other multipliers (embeddings and vectors scaled up with the width), not implemented."""
    if mup_width_mult is not None and cfg.name != "adamw":
        raise UserError(f"optim.name: {cfg.name} has no muP learning-rate rule here; model.parametrization mup "
                        "trains with optim.name adamw")


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) skipped non-finite steps, from the state of build_optimizer's chain."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def schedule_count(opt_state) -> jax.Array:
    """The step the learning-rate schedule is at: the next update applies schedule(schedule_count(opt_state)).

    It counts applied updates only: a skipped non-finite step does not advance the schedule (a step that did not
    train should not use up warm-up), so it falls behind the train step's own counter by the skipped steps.
    """
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
    if len(found) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer state, found {len(found)}")
    return found[0].count


LossSums = Callable[[Any, dict, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]


def split_microbatches(batch: dict, accum_steps: int) -> dict:
    """(B, ...) -> (A, B/A, ...), micro-batch i taking rows i, i+A, i+2A, ...

    Strided rows keep each device's share of every micro-batch on that device when the batch is sharded in
    contiguous blocks, so accumulation adds no data movement.
    """

    def split(x):
        b = x.shape[0]
        return x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_sums: LossSums, params: Any, batch: dict, accum_steps: int, key: jax.Array):
    """Sum of (loss, weight, aux, grad) over micro-batches.

    `loss_sums(params, micro_batch, key)` returns (loss_sum, (weight_sum, aux_sums)); its gradient is taken with
    respect to loss_sum. The caller divides by the total weight once.
    """
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    if accum_steps == 1:
        (loss, (weight, aux)), grads = grad_fn(params, batch, key)
        return loss, weight, aux, grads

    micro = split_microbatches(batch, accum_steps)
    keys = jax.random.split(key, accum_steps)

    def body(carry, xs):
        mb, k = xs
        (loss, (weight, aux)), grads = grad_fn(params, mb, k)
        return jax.tree.map(jnp.add, carry, (loss, weight, aux, grads)), None

    first_mb = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first_mb, keys[0]))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, (weight, aux)), grads = zeros
    (loss, weight, aux, grads), _ = jax.lax.scan(body, (loss, weight, aux, grads), (micro, keys))
    return loss, weight, aux, grads

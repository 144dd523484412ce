"""Pruning as an Optax wrapper: gradual magnitude pruning (Zhu & Gupta's cubic schedule) and N:M sparsity.

`prune(inner, cfg, logical_axes, total_steps)` wraps the experiment's chain. Its state holds a boolean mask per
parameter (shaped and sharded like it, so checkpoints, resume and restore onto another mesh carry the masks), the
count of applied updates, and the sparsity each pruned matrix had after the last update. Every update:
  1. masks the gradient (a pruned weight gets no moment and adds nothing to the clipping norm),
  2. runs the inner chain,
  3. on a mask-update step, recomputes the masks from the magnitudes the weights would have after the update,
  4. returns an update that lands every masked weight on exactly zero: -p where the mask is off.
So pruned weights are zero after every step, not only after the step that pruned them.

Which weights: the parameters whose path (blocks/0/attn/wq_DNH, ...) `targets` finds: by default the attention
and MLP projections, not embeddings, norms or the MoE router. N:M groups run along each matrix's input axis (the
axis the projection contracts; for an output projection the last input axis), the layout sparse tensor cores use.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from models.axes import PROJECTIONS, contracted_axes, n_stacked, path_name


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    method: Literal["none", "magnitude", "nm"] = "none"
    sparsity: float = 0.8  # magnitude: the final fraction of zeros in the targeted weights
    scope: Literal["layer", "global"] = "layer"  # magnitude: one threshold per matrix, or one over all of them
    n: int = 2  # nm: keep n of every m consecutive weights along the input axis
    m: int = 4
    start_step: int = 0  # masks change from this step (nm: are set at this step) ...
    end_step: int = 0  # ... to this one (0: three quarters into train.steps), then stay fixed
    update_every: int = 100  # steps between mask updates (Zhu & Gupta's delta t)
    targets: str = PROJECTIONS  # regex (re.search) over parameter paths

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 < self.n < self.m:
            raise ValueError(f"prune.n and prune.m must satisfy 0 < n < m, got {self.n}:{self.m}")
        if self.start_step < 0 or self.end_step < 0 or self.update_every < 1:
            raise ValueError("prune.start_step and prune.end_step must be >= 0 and prune.update_every >= 1")
        if self.end_step and self.end_step < self.start_step:
            raise ValueError(f"prune.end_step ({self.end_step}) must not come before prune.start_step "
                             f"({self.start_step})")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"prune.targets: {self.targets!r} is not a regex ({e})") from None

    def end(self, total_steps: int) -> int:
        return self.end_step or max(self.start_step, (3 * total_steps) // 4)

    def unreached(self, total_steps: int) -> str | None:
        """Why a run of total_steps ends before the pruning does (None when it does not)."""
        if self.method == "none":
            return None
        last = self.start_step if self.method == "nm" else self.end(total_steps)
        if last > total_steps:
            return (f"prune: the masks reach their target at step {last}, after train.steps {total_steps}; this run "
                    "ends less sparse (fine when the run will be extended)")
        return None


class PruneError(ValueError):
    """A prune setting that does not fit the model (the run builder reports it as a user error)."""


class PruneState(NamedTuple):
    count: jax.Array  # updates applied (a skipped non-finite step is not one)
    masks: Any  # bool, params-shaped: False where the weight is pruned
    sparsity: dict  # parameter path -> fraction of zeros after the last update
    inner: optax.OptState


@dataclasses.dataclass(frozen=True)
class _Leaf:
    name: str
    target: bool
    stacked: int  # leading STACKED axes: each slice is pruned as its own matrix
    group_axis: int  # nm: the input axis the groups of m run along


def _leaves(logical_axes: Any, cfg: PruneConfig) -> list[_Leaf]:
    regex = re.compile(cfg.targets)
    flat = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    out = []
    for path, axes in flat:
        name, stacked = path_name(path), n_stacked(axes)
        target = bool(regex.search(name)) and len(axes) - stacked >= 2
        out.append(_Leaf(name, target, stacked, contracted_axes(axes)[-1]))
    return out


def sparsity_at(cfg: PruneConfig, step: jax.Array, total_steps: int) -> jax.Array:
    """Zhu & Gupta: s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3) between t0 and t1; 0 before, s_f after."""
    t0, t1 = cfg.start_step, cfg.end(total_steps)
    frac = jnp.clip((step - t0) / max(t1 - t0, 1), 0.0, 1.0)
    return jnp.where(step >= t1, cfg.sparsity, cfg.sparsity * (1.0 - (1.0 - frac) ** 3))


def mask_update_due(cfg: PruneConfig, step: jax.Array, total_steps: int) -> jax.Array:
    """Whether the masks are recomputed for the weights after update number `step` (1 for the first update).
    N:M masks are set once, at start_step: afterwards a group's kept weights are its only nonzero ones."""
    t0, t1 = cfg.start_step, cfg.end(total_steps)
    if cfg.method == "nm":
        return step == max(t0, 1)
    return (step >= t0) & (step <= t1) & (((step - t0) % cfg.update_every == 0) | (step == t1))


def _slices(w: jax.Array, stacked: int) -> jax.Array:
    """(S, rest): one row per stacked slice."""
    return w.reshape(math.prod(w.shape[:stacked]), -1)


def _kept_by_magnitude(weights: list[jax.Array], leaves: list[_Leaf], sparsity: jax.Array,
                       scope: str) -> list[jax.Array]:
    """Masks keeping all but the floor(sparsity * size) smallest magnitudes, per slice or over all weights
    (weights tied at the threshold all go: with float weights a tie is rare). `global` sorts every pruned weight
    at once, so on an FSDP mesh a mask update gathers them all."""
    if scope == "global":
        flat = jnp.concatenate([jnp.abs(w).astype(jnp.float32).ravel() for w in weights])
        n_prune = jnp.floor(sparsity * flat.size).astype(jnp.int32)
        threshold = jnp.where(n_prune > 0, jnp.sort(flat)[jnp.maximum(n_prune - 1, 0)], -1.0)
        return [jnp.abs(w).astype(jnp.float32) > threshold for w in weights]
    out = []
    for w, leaf in zip(weights, leaves):
        rows = jnp.abs(_slices(w, leaf.stacked)).astype(jnp.float32)
        n_prune = jnp.floor(sparsity * rows.shape[1]).astype(jnp.int32)
        kth = jnp.take(jnp.sort(rows, axis=1), jnp.maximum(n_prune - 1, 0), axis=1)[:, None]
        threshold = jnp.where(n_prune > 0, kth, -1.0)
        out.append((rows > threshold).reshape(w.shape))
    return out


def _kept_n_of_m(w: jax.Array, axis: int, n: int, m: int) -> jax.Array:
    """Keep the n largest magnitudes of every m consecutive weights along `axis` (ties: the later one)."""
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    rank = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)  # 0: the smallest
    return jnp.moveaxis((rank >= m - n).reshape(moved.shape), -1, axis)


def prune(inner: optax.GradientTransformation, cfg: PruneConfig, logical_axes: Any,
          total_steps: int) -> optax.GradientTransformation:
    """`inner` with the pruning of `cfg` applied to the parameters `cfg.targets` finds (see the module doc).
    `logical_axes`: one tuple of logical names per parameter, shaped like the params the chain sees."""
    leaves = _leaves(logical_axes, cfg)
    targeted = [leaf for leaf in leaves if leaf.target]
    if not targeted:
        raise PruneError(f"prune.targets: {cfg.targets!r} finds no weight matrix; paths look like "
                         f"{leaves[-1].name if leaves else '(none)'}")

    def init(params):
        # Only tree.map over `params`: optax.tree_map_params (the state's shardings) calls this on a placeholder.
        check_shapes(jax.tree.leaves(params))
        masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
        sparsity = {leaf.name: jnp.zeros((), jnp.float32) for leaf in targeted}
        return PruneState(jnp.zeros((), jnp.int32), masks, sparsity, inner.init(params))

    def check_shapes(params: list[jax.Array]) -> None:
        for leaf, p in zip(leaves, params):
            if leaf.target and cfg.method == "nm" and p.shape[leaf.group_axis] % cfg.m:
                raise PruneError(f"prune.m: {leaf.name} has {p.shape[leaf.group_axis]} inputs along its "
                                 f"input axis, not a multiple of {cfg.m}; choose another m or prune.targets")

    def update(updates, state: PruneState, params=None):
        if params is None:
            raise ValueError("prune needs the params (the masks are computed from the weights)")
        p_flat, treedef = jax.tree.flatten(params)
        g_flat, m_flat = treedef.flatten_up_to(updates), treedef.flatten_up_to(state.masks)
        g_flat = [jnp.where(m, g, 0).astype(g.dtype) if leaf.target else g
                  for leaf, g, m in zip(leaves, g_flat, m_flat)]
        u, inner_state = inner.update(treedef.unflatten(g_flat), state.inner, params)
        u_flat = treedef.flatten_up_to(u)
        count = state.count + 1
        idx = [i for i, leaf in enumerate(leaves) if leaf.target]
        after = [jnp.where(m_flat[i], p_flat[i] + u_flat[i], 0) for i in idx]  # the weights this update would give

        def recompute(old: list[jax.Array]) -> list[jax.Array]:
            if cfg.method == "nm":
                new = [_kept_n_of_m(w, leaves[i].group_axis, cfg.n, cfg.m) for w, i in zip(after, idx)]
            else:
                s = sparsity_at(cfg, count, total_steps)
                new = _kept_by_magnitude(after, [leaves[i] for i in idx], s, cfg.scope)
            return [a & b for a, b in zip(new, old)]  # a pruned weight stays pruned

        old = [m_flat[i] for i in idx]
        new = jax.lax.cond(mask_update_due(cfg, count, total_steps), recompute, lambda o: o, old)
        sparsity = {}
        for i, m in zip(idx, new):
            p = p_flat[i]
            m_flat[i] = m
            u_flat[i] = jnp.where(m, u_flat[i], -p).astype(u_flat[i].dtype)  # p + (-p) is exactly 0
            sparsity[leaves[i].name] = jnp.mean(optax.apply_updates(p, u_flat[i]) == 0)
        return treedef.unflatten(u_flat), PruneState(count, treedef.unflatten(m_flat), sparsity, inner_state)

    return optax.GradientTransformation(init, update)


def prune_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """'sparsity' (zeros over all pruned matrices' weights, size-weighted) and 'sparsity/<path>' per parameter
    leaf, from the state of a chain holding `prune`; {} when nothing is pruned."""
    is_state = lambda x: isinstance(x, PruneState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    if not found:
        return {}
    state = found[0]
    sizes = {path_name(path): m.size for path, m in jax.tree_util.tree_flatten_with_path(state.masks)[0]}
    total = sum(sizes[name] for name in state.sparsity)
    overall = sum(v * sizes[name] for name, v in state.sparsity.items()) / total
    return {"sparsity": overall, **{f"sparsity/{k}": v for k, v in state.sparsity.items()}}


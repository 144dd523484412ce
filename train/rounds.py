"""Training with replicas (optim/outer.py): R model copies step on their own rows, and synchronise every H steps.

One jitted step does both: the experiment's own train step mapped over a leading replica axis (`jax.vmap` with
`spmd_axis_name="replica"`, so replica r runs on the devices of mesh index replica r, or all replicas on every
device when mesh.replica is 1), then, at a synchronisation step, the outer update under `lax.cond`. The global
batch of train.batch_size rows is split replica-major: replica r takes rows r B/R ... (r + 1) B/R - 1.

Inner steps never communicate across replicas (their parameters, gradients and optimizer states carry the
replica axis), apart from the few scalars of the step's metrics. A synchronisation averages the outer gradients
over the replica axis: the one exchange of parameters per round. With mesh.replica equal to the number of
processes, each process (host, slice) holds its own replicas: DiLoCo across machines is the same program.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optim.outer import (STATS, OuterConfig, OuterState, Piece, Replicated, compress, decompress, piece_get,
                         piece_set, piece_shape, piece_size, sent_bytes, sync_offsets, syncs_through)
from optim.privacy import clip_each, noised_mean
from optim.trainable import combine, select
from train.state import ModelDef, State
from train.step import train_step_fn


def with_replica(sharding: NamedSharding) -> NamedSharding:
    """The sharding of a per-replica copy: a leading axis over the replica mesh axis."""
    return NamedSharding(sharding.mesh, PartitionSpec("replica", *sharding.spec))


def outer_shardings(tx: Replicated, shapes: dict, p_shard: dict, replicated: NamedSharding) -> OuterState:
    """Shardings of an OuterState: per-replica copies of the inner state and parameters over the replica axis,
    the outer state like its pieces' parameters (a strided slice of layers keeps its leaf's layout)."""
    inner_shapes = jax.eval_shape(tx.inner.init, shapes)
    inner = optax.tree_map_params(tx.inner, lambda _, s: s, inner_shapes, p_shard,
                                  transform_non_params=lambda _: replicated)
    leaves, shard_leaves = jax.tree.leaves(shapes), jax.tree.leaves(p_shard)
    outer = []
    for pieces in tx.fragments(shapes):
        piece_shapes = [jax.ShapeDtypeStruct(piece_shape(leaves[p.leaf].shape, p), jnp.float32)
                        for p in pieces]
        outer.append(optax.tree_map_params(tx.outer, lambda _, s: s, jax.eval_shape(tx.outer.init, piece_shapes),
                                           [shard_leaves[p.leaf] for p in pieces],
                                           transform_non_params=lambda _: replicated))
    return OuterState(inner=jax.tree.map(with_replica, inner), replicas=jax.tree.map(with_replica, p_shard),
                      outer=tuple(outer), stats={k: replicated for k in STATS}, secret=replicated)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What is fixed before the run: who trains in each round with what weight, and the bytes each sync sends.

    weights: (rounds, R) each replica's share of the mean in each round (1/R without clients); a run longer
    than the table keeps using its last row (see data/partition.py for how the clients are drawn)."""
    cfg: OuterConfig
    weights: np.ndarray
    fragment_bytes: tuple[int, ...]  # bytes one replica sends when fragment f synchronises
    sync_bytes_per_step: int  # bytes one replica's gradient would take in synchronous data parallelism
    positions_per_step: int = 0  # train.batch_size x train.seq_len: token positions trained per step
    epsilons: np.ndarray | None = None  # DP: epsilon at outer.dp_delta after round k + 1

    def host_metrics(self, step: int) -> dict:
        """Cumulative communication after `step` steps (and the privacy spent), computed on the host in float64."""
        cfg, h = self.cfg, self.cfg.inner_steps
        per_replica = sum(syncs_through(step, off, h) * b for off, b in zip(sync_offsets(cfg), self.fragment_bytes))
        out = {"comm_bytes": float(cfg.replicas * per_replica),
               "sync_comm_bytes": float(cfg.replicas * step * self.sync_bytes_per_step),
               "rounds": step // h}
        if self.positions_per_step and step:
            out["comm_bytes_per_token"] = out["comm_bytes"] / (step * self.positions_per_step)
            out["sync_comm_bytes_per_token"] = out["sync_comm_bytes"] / (step * self.positions_per_step)
        if self.epsilons is not None and step >= h:
            out["dp_epsilon"] = float(self.epsilons[min(step // h, len(self.epsilons)) - 1])
        return out


def round_plan(tx: Replicated, shapes: dict, total_steps: int, weights: np.ndarray | None = None,
               epsilons: np.ndarray | None = None, positions_per_step: int = 0) -> RoundPlan:
    cfg = tx.cfg
    leaves = jax.tree.leaves(shapes)
    fragment_bytes = tuple(sum(sent_bytes(piece_size(leaves[p.leaf].shape, p), cfg.send, cfg.quant_block)
                               for p in pieces) for pieces in tx.fragments(shapes))
    sync = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
    if weights is None:
        rounds = -(-total_steps // cfg.inner_steps)
        weights = np.full((rounds, cfg.replicas), 1.0 / cfg.replicas, np.float32)
    return RoundPlan(cfg, np.asarray(weights, np.float32), fragment_bytes, sync, positions_per_step, epsilons)


def make_round_step(mdef: ModelDef, tx: Replicated, schedule: optax.Schedule, plan: RoundPlan, *, accum_steps: int,
                    seed: int, state_shardings: State, batch_sharding: NamedSharding,
                    flags_sharding: NamedSharding, diagnostics: int = 0) -> Callable:
    """The jitted (state, batch, flags) -> (state, metrics) of a run with replicas. With diagnostics, each
    replica's step computes them and metrics['diag'] is their mean over the replicas (see _reduce)."""
    cfg, mask = tx.cfg, mdef.trainable
    r, h = cfg.replicas, cfg.inner_steps
    mesh = batch_sharding.mesh
    inner_step = train_step_fn(mdef, tx.inner, schedule, accum_steps=accum_steps, seed=seed,
                               param_shardings=state_shardings["params"], diagnostics=diagnostics)
    rows = batch_sharding.spec[0]
    within = tuple(a for a in (rows if isinstance(rows, tuple) else (rows,)) if a and a != "replica")
    replica_rows = NamedSharding(mesh, PartitionSpec("replica", within or None))
    shapes = select(mdef.param_shapes(), mask)
    fragments = tx.fragments(shapes)
    offsets = sync_offsets(cfg)
    weights = jnp.asarray(plan.weights)

    def step(state: State, batch: dict, flags_DF: jax.Array) -> tuple[State, dict]:
        os_: OuterState = state["opt_state"]
        batch_R = jax.tree.map(lambda x: x.reshape(r, x.shape[0] // r, *x.shape[1:]), batch)
        batch_R = jax.lax.with_sharding_constraint(batch_R, jax.tree.map(lambda _: replica_rows, batch_R))
        anchor = select(state["params"], mask)

        def one(params_r, inner_r, batch_r, index):
            s = {"step": state["step"], "params": combine(state["params"], params_r, mask), "opt_state": inner_r}
            s, m = inner_step(s, batch_r, index if r > 1 else None, anchor, cfg.prox_mu)
            return select(s["params"], mask), s["opt_state"], m

        if r == 1:  # the plain step on the one replica (a vmap of one would fuse differently: not bit-exact)
            out = one(*jax.tree.map(lambda x: x[0], (os_.replicas, os_.inner, batch_R)), 0)
            params_R, inner_R, m_R = jax.tree.map(lambda x: x[None], out)
        else:
            params_R, inner_R, m_R = jax.vmap(one, spmd_axis_name="replica")(os_.replicas, os_.inner, batch_R,
                                                                              jnp.arange(r))
        done = state["step"] + 1
        state = {"step": done, "params": state["params"],
                 "opt_state": os_._replace(inner=inner_R, replicas=params_R)}
        for f, pieces in enumerate(fragments):
            sync = functools.partial(_sync, tx=tx, mask=mask, fragment=f, pieces=pieces, weights=weights, mesh=mesh)
            state = jax.lax.cond(done % h == offsets[f], sync, lambda s: s, state)
        return state, {**_reduce(m_R), **state["opt_state"].stats, "flags": flags_DF.max(0)}

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding, flags_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def _reduce(m_R: dict) -> dict:
    """One step's metrics over replicas: the loss weighted by tokens, counts summed, the rest averaged."""
    tokens = m_R["tokens"]
    out = {"loss": jnp.sum(m_R["loss"] * tokens) / jnp.maximum(jnp.sum(tokens), 1.0), "tokens": jnp.sum(tokens),
           "lr": m_R["lr"][0], "skipped_steps": jnp.sum(m_R["skipped_steps"]),
           "nonfinite_in_a_row": jnp.max(m_R["nonfinite_in_a_row"])}
    return {**{k: jnp.mean(v, axis=0) for k, v in m_R.items() if k not in out}, **out}


def _sync(state: State, *, tx: Replicated, mask, fragment: int, pieces: list[Piece], weights: jax.Array,
          mesh) -> State:
    """The outer step of one fragment: average the replicas' outer gradients, move the anchor, restart them."""
    cfg = tx.cfg
    os_: OuterState = state["opt_state"]
    anchor_tree = select(state["params"], mask)
    anchor, treedef = jax.tree.flatten(anchor_tree)
    replicas = treedef.flatten_up_to(os_.replicas)
    a = [piece_get(anchor[p.leaf], p).astype(jnp.float32) for p in pieces]
    reps = [piece_get(replicas[p.leaf], p, axis=1).astype(jnp.float32) for p in pieces]
    deltas_R = [ai[None] - ri for ai, ri in zip(a, reps)]
    done = state["step"]
    round_index = jnp.minimum(done // cfg.inner_steps - 1 if fragment == 0 else done // cfg.inner_steps,
                              weights.shape[0] - 1)
    w_R = weights[jnp.maximum(round_index, 0)]
    stats = dict(os_.stats)
    if cfg.private:
        deltas_R, norms_R = clip_each(deltas_R, cfg.dp_clip)
        stats["client_norm_max"] = jnp.max(norms_R)
    if cfg.send != "float32":
        deltas_R = [_sent(d, cfg, mesh) for d in deltas_R]
        if cfg.private:  # rounding to the nearest level can lengthen a clipped update: clip what arrives
            deltas_R, _ = clip_each(deltas_R, cfg.dp_clip)
    if cfg.private:
        stats["clipped_norm_max"] = jnp.max(jax.vmap(optax.tree.norm)(deltas_R))
        key = jax.random.fold_in(jax.random.wrap_key_data(os_.secret), done)
        mean = noised_mean([jnp.sum(d, axis=0) for d in deltas_R], key, cfg.dp_clip, cfg.dp_noise, cfg.replicas)
    else:
        mean = [jnp.tensordot(w_R, d, axes=1) for d in deltas_R]
    stats["outer_grad_norm"] = optax.tree.norm(mean)
    if cfg.averages:  # FedAvg / local SGD: the weighted mean of the replicas itself, with no rounding detour
        new_a, outer_f = [jnp.tensordot(w_R, ri, axes=1) for ri in reps], os_.outer[fragment]
    else:
        updates, outer_f = tx.outer.update(mean, os_.outer[fragment], a)
        new_a = optax.apply_updates(a, updates)
    for p, value in zip(pieces, new_a):
        anchor[p.leaf] = piece_set(anchor[p.leaf], p, value)
        fresh = jnp.broadcast_to(value, (replicas[p.leaf].shape[0], *value.shape))
        replicas[p.leaf] = piece_set(replicas[p.leaf], p, fresh, axis=1)
    outer = tuple(outer_f if i == fragment else s for i, s in enumerate(os_.outer))
    anchor_tree = treedef.unflatten(anchor)
    inner = fresh_inner(tx.inner, anchor_tree, os_.inner) if cfg.clients else os_.inner
    new_os = os_._replace(inner=inner, replicas=treedef.unflatten(replicas), outer=outer, stats=stats)
    return {"step": done, "params": combine(state["params"], anchor_tree, mask), "opt_state": new_os}


def fresh_inner(inner_tx: optax.GradientTransformation, params, old_R):
    """A new inner optimizer state for every replica (the next round's clients start their own, as FedAvg's
    clients do, and no client's moments carry into another's update), keeping the learning-rate schedule's
    place and the skipped-step counters."""
    r = jax.tree.leaves(old_R)[0].shape[0]
    new = jax.tree.map(lambda x: jnp.broadcast_to(x, (r, *x.shape)), inner_tx.init(params))
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    new = jax.tree.map(lambda n, o: o if is_schedule(n) else n, new, old_R, is_leaf=is_schedule)
    if isinstance(new, optax.ApplyIfFiniteState):
        new = new._replace(notfinite_count=old_R.notfinite_count, total_notfinite=old_R.total_notfinite)
    return new


def _sent(delta_R: jax.Array, cfg: OuterConfig, mesh) -> jax.Array:
    """What the other replicas receive of each replica's outer gradient. The compressed payload is gathered
    to every device before it is expanded, so across machines the wire carries the int8 / 4-bit values."""
    like = jax.ShapeDtypeStruct(delta_R.shape[1:], jnp.float32)
    payload = jax.vmap(lambda d: compress(d, cfg.send, cfg.quant_block))(delta_R)
    everywhere = NamedSharding(mesh, PartitionSpec())
    payload = jax.lax.with_sharding_constraint(payload, jax.tree.map(lambda _: everywhere, payload))
    return jax.vmap(lambda p: decompress(p, cfg.send, like))(payload)

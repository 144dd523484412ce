"""Training diagnostics (log.diagnostics_every > 0): per-layer and per-parameter-group gradient norms, update /
parameter norm ratios and the residual stream's RMS at each layer's output, with warnings for vanishing and
exploding layers.

The jitted step computes them (`step_diagnostics`) and packs every figure into one float32 vector,
metrics["diag"], so the loop fetches one small array per step; `Layout` names its entries. The host
(`Diagnostics`) writes them into the log rows of steps that are multiples of log.diagnostics_every and warns about
layers whose gradient norm is far from the median layer's. Keys in metrics.jsonl and TensorBoard:

    diag/grad_norm/layer_<i>        norm of the gradient of layer i's trained parameters (before clipping)
    diag/update_ratio/layer_<i>     norm of the optimizer's update of them / their norm before the update
    diag/act_rms/layer_<i>          RMS of the residual stream at layer i's output (all layers)
    diag/grad_norm/<group>          the same two over a parameter group: attn, mlp, norm (every norm's scales and
    diag/update_ratio/<group>       biases), embed (token and position tables; also the head when tied), head
    diag/vanishing_layers           how many layers that row's check flagged
    diag/exploding_layers

Layers are numbered from 0 in depth order, whether the model scans them (a leading 'layers' axis) or not; a layer
or group without trained parameters (train.trainable, LoRA) has no grad_norm or update_ratio keys.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from optim.trainable import path_name, select
from parallel.errors import UserError

GROUPS = ("attn", "mlp", "norm", "embed", "head", "other")
KEY = "diag"  # the step's metric that holds the packed vector


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one trained leaf's squares go: its group, and its layer (None: in no layer). A leaf stacked over
    scanned units holds layers first, first + stride, ... (stride = layers per scanned unit)."""
    group: str
    first: int | None = None
    stacked: bool = False
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static map from a model's trained parameters to the diagnostics vector's entries."""
    n_layers: int
    slots: tuple[Slot, ...]  # one per trained leaf, in tree order
    layers: tuple[int, ...]  # layers with trained parameters
    groups: tuple[str, ...]  # groups with trained parameters
    layer_paths: tuple[str, ...]  # how the warnings name each layer's parameters

    def names(self) -> list[str]:
        """The metric names of the packed vector's entries, in order (see the module docstring)."""
        per_layer = lambda what, layers: [f"diag/{what}/layer_{i}" for i in layers]  # noqa: E731
        return (per_layer("grad_norm", self.layers) + per_layer("update_ratio", self.layers)
                + per_layer("act_rms", range(self.n_layers)) + [f"diag/grad_norm/{g}" for g in self.groups]
                + [f"diag/update_ratio/{g}" for g in self.groups])


def group_of(path: str) -> str:
    """A parameter's group from its path ('blocks/0/attn/wq_DNH', 'final_norm/scale_D', ...)."""
    parts = path.split("/")
    if any(p.endswith("norm") for p in parts) or re.search(r"/scale_[qk]_H$", path):  # qk-norm scales too
        return "norm"
    for group in ("attn", "mlp"):  # LoRA adapters (wq_DNH_lora/wa) go with their projection
        if group in parts:
            return group
    if parts[-1] in ("embed_VD", "pos_TD"):
        return "embed"
    return "head" if parts[-1] == "head_DV" else "other"


def layout(model_cfg, shapes: dict, logical_axes: dict, mask=None) -> Layout:
    """The layout of a model's parameters (ModelDef.param_shapes(), .logical_axes(), .trainable)."""
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(select(shapes, mask))[0]
    axes = {path_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_axes)[0]}
    per_unit = model_cfg.moe_every if model_cfg.grouped_layers else 1
    slots = []
    for path, _ in flat:
        name = path_name(path)
        parts, group = name.split("/"), group_of(name)
        if parts[0] != "blocks":
            slots.append(Slot(group))
        elif axes[name][:1] == ("layers",):  # scanned: blocks/... or, grouped, blocks/layers/<j>/...
            slots.append(Slot(group, int(parts[2]) if per_unit > 1 else 0, stacked=True, stride=per_unit))
        else:
            slots.append(Slot(group, int(parts[1])))
    n = model_cfg.n_layers
    layers = sorted({i for s in slots if s.first is not None
                     for i in (range(s.first, n, s.stride) if s.stacked else [s.first])})
    groups = tuple(g for g in GROUPS if any(s.group == g for s in slots))
    return Layout(n, tuple(slots), tuple(layers), groups, tuple(layer_path(model_cfg, i) for i in range(n)))


def layer_path(model_cfg, i: int) -> str:
    """Layer i's parameters as paths name them; [k] is an index on a scanned model's leading 'layers' axis."""
    if not model_cfg.scan_layers:
        return f"blocks/{i}"
    if model_cfg.grouped_layers:
        return f"blocks/layers/{i % model_cfg.moe_every}[{i // model_cfg.moe_every}]"
    return f"blocks[{i}]"


def _squares(tree, lay: Layout) -> tuple[jax.Array, jax.Array]:
    """Sums of squares of a trained-params-shaped tree: per layer (n_layers,) and per group (len(groups),)."""
    stacked = jnp.zeros((lay.n_layers,), jnp.float32)
    in_layer: dict[int, list] = {}
    in_group: dict[str, list] = {}
    for x, slot in zip(jax.tree.leaves(tree), lay.slots, strict=True):
        x = x.astype(jnp.float32)
        if slot.stacked:
            per_unit = jnp.sum(x * x, axis=tuple(range(1, x.ndim)))
            # unit u holds layer first + u * stride: interior padding puts it there in one op
            stacked = stacked + jax.lax.pad(per_unit, 0.0, [(slot.first, slot.stride - 1 - slot.first,
                                                             slot.stride - 1)])
            total = jnp.sum(per_unit)
        else:
            total = jnp.sum(x * x)
            if slot.first is not None:
                in_layer.setdefault(slot.first, []).append(total)
        in_group.setdefault(slot.group, []).append(total)
    per_layer = stacked + jnp.stack([sum(in_layer.get(i, []), jnp.float32(0)) for i in range(lay.n_layers)])
    return per_layer, jnp.stack([sum(in_group[g]) for g in lay.groups])


def step_diagnostics(lay: Layout, grads, updates, params, act_ms: jax.Array) -> jax.Array:
    """The packed diagnostics vector (Layout.names() order) of one step: `grads` (what the optimizer got),
    `updates` (what it returned) and `params` (before the update) are trained-params-shaped; act_ms (L,) comes
    from the forward pass (Transformer(act_stats=True))."""
    g_layer, g_group = _squares(grads, lay)
    u_layer, u_group = _squares(updates, lay)
    p_layer, p_group = _squares(params, lay)
    layers = np.asarray(lay.layers, np.int32)
    ratio = lambda u, p: jnp.sqrt(u) / jnp.sqrt(p)  # noqa: E731  (a zero parameter norm gives inf, logged null)
    return jnp.concatenate([jnp.sqrt(g_layer[layers]), ratio(u_layer, p_layer)[layers], jnp.sqrt(act_ms),
                            jnp.sqrt(g_group), ratio(u_group, p_group)])


def unpack(lay: Layout, vector) -> dict[str, float]:
    """metrics['diag'] as {name: value}."""
    values = np.asarray(vector, np.float64).reshape(-1)
    names = lay.names()
    assert len(values) == len(names), (len(values), len(names))
    return dict(zip(names, map(float, values)))


def check_every(every: int, log_every: int) -> None:
    """Diagnostics are written into log rows: their period must be a whole number of rows."""
    if every and every % log_every:
        near = log_every * max(1, every // log_every)
        raise UserError(f"log.diagnostics_every: {every} is not a multiple of train.log_every ({log_every}); "
                        f"diagnostics are written into the log rows: use e.g. {near}")


class Diagnostics:
    """The host side: the log-row keys of a diagnostics step and the vanishing / exploding warnings."""

    def __init__(self, lay: Layout | None, every: int, vanishing: float, exploding: float,
                 log: Callable[[str], None]):
        self.lay, self.every, self.vanishing, self.exploding, self.log = lay, every, vanishing, exploding, log

    def row(self, step: int, window: list[dict]) -> dict[str, float]:
        """The keys for the log row of `step`, from the window's last step (that step); {} between periods."""
        if not self.every or step % self.every or not window or KEY not in window[-1]:
            return {}
        values = unpack(self.lay, window[-1][KEY])
        low, high = self.check(step, values)
        return {**values, "diag/vanishing_layers": len(low), "diag/exploding_layers": len(high)}

    def check(self, step: int, values: dict[str, float]) -> tuple[list[int], list[int]]:
        """Layers whose gradient norm is below median / vanishing or above median x exploding; one warning line
        per kind. Skipped when the median is not a positive finite number (a non-finite step: Health warns)."""
        norms = {i: values[f"diag/grad_norm/layer_{i}"] for i in self.lay.layers}
        median = float(np.median(list(norms.values()))) if norms else math.nan
        if not (math.isfinite(median) and median > 0):
            return [], []
        low = [i for i, v in norms.items() if v < median / self.vanishing]
        high = [i for i, v in norms.items() if v > median * self.exploding]
        for kind, flagged, factor in (("vanishing", low, self.vanishing), ("exploding", high, self.exploding)):
            if flagged:
                what = "; ".join(f"layer {i} ({self.lay.layer_paths[i]}) grad norm {norms[i]:.2e} = "
                                 f"{norms[i] / median:.1e} x" for i in flagged)
                self.log(f"meshforge: warning: {kind} gradient at step {step}: {what} the median layer's "
                         f"{median:.2e} (log.{kind}_factor {factor:g})")
        return low, high


def diagnostics_for(setup, log: Callable[[str], None]) -> Diagnostics:
    """The run's host-side diagnostics (a no-op with log.diagnostics_every 0)."""
    lc, mdef = setup.cfg.log, setup.mdef
    lay = layout(mdef.cfg, mdef.param_shapes(), mdef.logical_axes(), mdef.trainable) if lc.diagnostics_every else None
    return Diagnostics(lay, lc.diagnostics_every, lc.vanishing_factor, lc.exploding_factor, log)

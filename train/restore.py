"""Loading a run's parameters outside its own training: for eval/sample/export, and as the start of another
run (train.init_from)."""
from __future__ import annotations

from pathlib import Path

import jax

from optim.chains import build_optimizer
from optim.trainable import select
from parallel.errors import UserError
from parallel.rules import activate
from train.checkpoint import Checkpointer, has_checkpoints
from train.config import Config
from train.setup import build
from train.state import abstract_state, model_def, state_shardings


def restore_params(saved: Config, workdir: Path, mdef, param_shardings: dict) -> dict:
    """The latest checkpoint's parameters of the run in `workdir` (made with config `saved`), placed with
    `param_shardings` of the current mesh: the base parameters of `mdef` (a run starting from this one)."""
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
    step = max(ckpt.all_steps(), default=None)
    if step is None:
        raise UserError(f"train.init_from: {workdir} has no checkpoint yet")
    src = model_def(saved.model, saved.train.trainable)
    if src.cfg.scan_layers != mdef.cfg.scan_layers:
        raise UserError(f"train.init_from: {workdir} was trained with model.scan_layers "
                        f"{str(src.cfg.scan_layers).lower()}; use the same setting (or export it to HF first)")
    tx, _ = build_optimizer(saved.optim, saved.train.steps, select(src.logical_axes(), src.trainable))
    src_shardings = state_shardings(tx, src, jax.tree.leaves(param_shardings)[0].mesh)
    try:
        state, _ = ckpt.restore_quietly(step, abstract_state(tx, src, src_shardings))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"train.init_from: checkpoint {step} of {workdir} cannot be restored ({e})") from None
    finally:
        ckpt.close()
    return overlay_present(state["params"], param_shardings)


def overlay_present(params: dict, shardings: dict) -> dict:
    """`params` placed with `shardings` for every leaf both trees have (a run's params into another's layout)."""
    out = {}
    for k, v in params.items():
        if k in shardings:
            out[k] = overlay_present(v, shardings[k]) if isinstance(v, dict) else jax.device_put(v, shardings[k])
    return out


def restore_for_inference(cfg: Config, workdir: Path, step: int | None = None):
    """(setup, params, step) from a run's checkpoint, placed on the current mesh."""
    workdir = Path(workdir)
    if not has_checkpoints(workdir / "checkpoints"):
        raise UserError(f"{workdir}: no checkpoints to load; train first, or pass the run's --workdir")
    setup = build(cfg, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)  # a run may be saving into it right now
    steps = ckpt.all_steps()
    step = max(steps, default=None) if step is None else step
    if step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {workdir}; available: {', '.join(map(str, steps))}")
    with activate(setup.mesh):
        try:
            state, _ = ckpt.restore_quietly(step, abstract_state(setup.tx, setup.mdef, setup.shardings))
        except Exception as e:  # noqa: BLE001 - unreadable or made by another config: one line, not a traceback
            raise UserError(f"checkpoint {step} in {workdir} cannot be restored ({e}); it is damaged or was "
                            "written by an incompatible version or config") from None
        finally:
            ckpt.close()
    return setup, state["params"], step

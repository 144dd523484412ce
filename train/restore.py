"""Loading a run's parameters outside its own training: for eval/sample/export, and as the start of another
run (train.init_from)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from data.tokenize import load_tokenizer
from models.lora import merge
from parallel.errors import UserError
from parallel.mesh import make_mesh
from parallel.rules import activate
from train.checkpoint import Checkpointer, has_checkpoints
from train.config import Config
from train.setup import build, optimizer, resolve_model
from train.state import ModelDef, abstract_state, model_def, state_shardings


def restore_params(saved: Config, workdir: Path, mdef, param_shardings: dict) -> dict:
    """The latest checkpoint's parameters of the run in `workdir` (made with config `saved`), placed with
    `param_shardings` of the current mesh: the base parameters of `mdef` (a run starting from this one)."""
    if not has_checkpoints(workdir / "checkpoints"):
        raise UserError(f"train.init_from: {workdir} has no checkpoint yet")
    src = model_def(saved.model, saved.train.trainable)
    if src.cfg.scan_layers != mdef.cfg.scan_layers:
        raise UserError(f"train.init_from: {workdir} was trained with model.scan_layers "
                        f"{str(src.cfg.scan_layers).lower()}; use the same setting (or export it to HF first)")
    tx, _ = optimizer(saved, src)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    state, _ = _restore(workdir, None, mesh, tx, src, state_shardings(tx, src, mesh))
    params = state["params"]
    if src.cfg.lora_rank:  # the source's fine-tuning is part of the model this run starts from
        params = merge(params, src.cfg.lora_alpha / src.cfg.lora_rank)
    return overlay_present(params, param_shardings, mdef.param_shapes())


def overlay_present(params: dict, shardings: dict, shapes: dict) -> dict:
    """`params` placed with `shardings`, in the dtypes of `shapes`, for every leaf all three trees have (a run's
    params into another's layout; this run's own new leaves, e.g. fresh adapters, are left out)."""
    out = {}
    for k, v in params.items():
        if k not in shardings:
            continue
        if isinstance(v, dict):
            out[k] = overlay_present(v, shardings[k], shapes[k])
        else:
            out[k] = jax.device_put(v.astype(shapes[k].dtype), shardings[k])
    return out


@dataclasses.dataclass
class Loaded:
    """A run's model and parameters for inference (sample, export): no data pipeline is built, so the run's
    training data need not be reachable; the tokenizer is the run's own tokenizer.json."""
    cfg: Config
    mesh: Mesh
    mdef: ModelDef
    param_shardings: dict
    params: dict
    step: int
    tokenizer: Any


def restore_for_inference(cfg: Config, workdir: Path, step: int | None = None):
    """(setup, params, step) from a run's checkpoint, placed on the current mesh (eval: with the data)."""
    workdir = Path(workdir)
    _check_has_checkpoints(workdir)
    setup = build(cfg, workdir)
    state, step = _restore(workdir, step, setup.mesh, setup.tx, setup.mdef, setup.shardings)
    return setup, state["params"], step


def load_for_inference(cfg: Config, workdir: Path, step: int | None = None) -> Loaded:
    workdir = Path(workdir)
    _check_has_checkpoints(workdir)
    tokenizer = load_tokenizer(workdir / "tokenizer.json")
    cfg = resolve_model(cfg, tokenizer.vocab_size)
    mesh = make_mesh(cfg.mesh)
    mdef = model_def(cfg.model, cfg.train.trainable)
    tx, _ = optimizer(cfg, mdef)
    shardings = state_shardings(tx, mdef, mesh)
    state, step = _restore(workdir, step, mesh, tx, mdef, shardings)
    return Loaded(cfg, mesh, mdef, shardings["params"], state["params"], step, tokenizer)


def _check_has_checkpoints(workdir: Path) -> None:
    if not has_checkpoints(workdir / "checkpoints"):
        raise UserError(f"{workdir}: no checkpoints to load; train first, or pass the run's --workdir")


def _restore(workdir: Path, step: int | None, mesh: Mesh, tx, mdef: ModelDef, shardings):
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)  # a run may be saving into it right now
    steps = ckpt.all_steps()
    step = max(steps, default=None) if step is None else step
    if step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {workdir}; available: {', '.join(map(str, steps))}")
    with activate(mesh):
        try:
            state, _ = ckpt.restore_quietly(step, abstract_state(tx, mdef, shardings))
        except Exception as e:  # noqa: BLE001 - unreadable or made by another config: one line, not a traceback
            raise UserError(f"checkpoint {step} in {workdir} cannot be restored ({e}); it is damaged or was "
                            "written by an incompatible version or config") from None
        finally:
            ckpt.close()
    return state, step

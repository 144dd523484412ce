"""Orbax checkpoints: async saves of the train state plus JSON extras (data-iterator state, resolved config).

A thin wrapper over the stable CheckpointManager API, so a later move to Orbax's v1 API touches one file.
Restores always target the *current* mesh's shardings, which is what lets a run continue on another mesh.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from parallel.errors import UserError


class Checkpointer:
    def __init__(self, directory: Path, keep: int, keep_every: int = 0):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=True,
            create=True,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, extra: dict, force: bool = True) -> None:
        """Start an async save; the training loop continues while Orbax writes."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        extra=ocp.args.JsonSave(extra)), force=force)

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     extra=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {self.directory / str(step)} does not match this model ({e}); "
                            "use a new --workdir or the run's original model config") from None
        return out.state, dict(out.extra)

    def restore_extra(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def has_checkpoints(directory: Path) -> bool:
    d = Path(directory)
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

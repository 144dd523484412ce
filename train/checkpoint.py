"""Orbax checkpoints: async saves of the train state plus JSON extras (data-iterator state, resolved config).

A thin wrapper over the stable CheckpointManager API, so a later move to Orbax's v1 API touches one file.
Restores always target the *current* mesh's shardings, which is what lets a run continue on another mesh.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import sys
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from parallel.errors import UserError
from parallel.hosts import barrier, processes_where


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3, keep_every: int = 0, read_only: bool = False):
        """read_only: for eval and sample, which may run beside a training run on the same workdir; a writing
        manager would clean up the half-written save that run is making."""
        self.directory = Path(directory).absolute()
        self.manager = None if read_only else ocp.CheckpointManager(
            self.directory, item_names=("state", "extra"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                keep_period=keep_every or None,
                enable_async_checkpointing=True,
                create=True,
                cleanup_tmp_directories=True,  # half-written saves of a killed run are never picked up
            ))
        # Restores go through a read-only manager local to this process: Orbax's multi-process restore ends in a
        # collective barrier, which a process whose shard failed to read never reaches, leaving the others
        # blocked in it. Locally each process reads the shards its devices need and no process waits on another;
        # restore_latest_valid then takes the verdict of all processes together.
        me = jax.process_index()
        local = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        self.reader = ocp.CheckpointManager(self.directory, item_names=("state", "extra"),
                                            options=ocp.CheckpointManagerOptions(read_only=True,
                                                                                 multiprocessing_options=local))

    def latest_step(self) -> int | None:
        return (self.manager or self.reader).latest_step()

    def all_steps(self) -> list[int]:
        return list((self.manager or self.reader).all_steps())

    def save(self, step: int, state: Any, extra: dict, force: bool = True) -> None:
        """Start an async save; the training loop continues while Orbax writes."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        extra=ocp.args.JsonSave(extra)), force=force)

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        out = self.reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 extra=ocp.args.JsonRestore()))
        return out.state, dict(out.extra)

    def restore_quietly(self, step: int, target: Any) -> tuple[Any, dict]:
        """restore(), with the failure reduced to one line (no background-thread tracebacks)."""
        try:
            with _quiet_async_leftovers():
                return self.restore(step, target)
        except Exception as e:
            raise RuntimeError(_first_line(e)) from None

    def restore_latest_valid(self, target: Any, warn: Callable[[str], None]) -> tuple[Any, dict, int]:
        """Restore the newest readable checkpoint. Newer ones that fail to read while an older one reads fine
        are corrupt: they are moved to WORKDIR/corrupt_checkpoints/ (never deleted) and reported in one line."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            error = None
            try:
                state, extra = self.restore_quietly(step, target)
            except RuntimeError as e:  # any read failure of one checkpoint means: try the previous
                error = str(e)
            # Each process reads only the shards its devices hold: one damaged shard fails one process, and all
            # of them must then give up on that checkpoint together.
            bad_on = processes_where(error is not None)
            if bad_on:
                failed.append((step, error or f"a shard failed to read on process {bad_on[0]}"))
                continue
            for bad, reason in failed:
                where = self.quarantine(bad)
                warn(f"checkpoint {bad} is unreadable ({reason}); moved to {where}, resuming from step {step}")
            return state, extra, step
        step, reason = failed[0]
        raise UserError(f"no checkpoint in {self.directory} can be restored (step {step}: {reason}); if the model "
                        "or optimizer changed, use the original config or start over with --fresh")

    def quarantine(self, step: int) -> Path:
        """Move a damaged checkpoint aside. Every process found it unreadable (they read the same files), but
        only process 0 moves it; the others wait for the move before they look at the directory again."""
        dest = self.directory.parent / "corrupt_checkpoints" / f"{step}"
        if jax.process_index() == 0:
            if dest.exists():
                dest = dest.with_name(f"{step}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        barrier(f"quarantine-{step}")
        for manager in (self.manager, self.reader):
            if manager:
                manager.reload()
        return dest

    def restore_extra(self, step: int) -> dict:
        return dict(self.reader.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra)

    def wait(self) -> None:
        if self.manager:
            self.manager.wait_until_finished()

    def close(self) -> None:
        for manager in (self.manager, self.reader):
            if manager:
                manager.close()


@contextlib.contextmanager
def _quiet_async_leftovers():
    """A failed read leaves futures and TensorStore callbacks aimed at Orbax's closed event loop; as they are
    collected each would print a traceback. They carry nothing beyond the one error we report."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None
    try:
        yield
    finally:
        gc.collect()  # collect the leftovers while their reports are still muted
        sys.unraisablehook = previous


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def latest_committed_step(directory: Path) -> int | None:
    """The newest checkpoint whose save finished, read from the files alone (no Orbax manager: used when the
    disk has failed)."""
    steps = [int(p.name) for p in Path(directory).glob("*")
             if p.name.isdigit() and (p / "commit_success.txt").exists()]
    return max(steps, default=None)


def has_checkpoints(directory: Path) -> bool:
    d = Path(directory)
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

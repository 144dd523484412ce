"""Orbax checkpoints: async saves of the train state plus JSON extras (data-iterator state, resolved config).

A thin wrapper over the stable CheckpointManager API, so a later move to Orbax's v1 API touches one file.
Restores always target the *current* mesh's shardings, which is what lets a run continue on another mesh.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import gc
import os
import re
import sys
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from parallel.errors import UserError
from parallel.hosts import barrier, processes_where
from train.workdir import exception_chain

# Waits before the 2nd, 3rd and 4th read of a checkpoint whose storage failed (about 20 s in all: a network
# filesystem's hiccup, a gcsfuse remount, a GCS 503 burst that TensorStore's own retries did not absorb).
RETRY_DELAYS_S = (1.0, 4.0, 16.0)


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
        """Restore the newest readable checkpoint. Newer ones whose data is damaged (see `read_failure_in_storage`) while
        an older one reads fine are moved to WORKDIR/corrupt_checkpoints/ (never deleted) and reported in one
        line. A read that fails in the storage itself is retried (RETRY_DELAYS_S, one warning each); if it
        keeps failing the run stops with a UserError and moves nothing: falling back would silently drop the
        newest steps, and the next save would land beside a checkpoint that may well be intact."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            restored, error, storage = self._restore_retrying(step, target, warn)
            # Each process reads only the shards its devices hold: one damaged shard fails one process, and all
            # of them must then give up on that checkpoint together (or all stop, for a storage failure).
            stuck_on = processes_where(storage)
            if stuck_on:
                reason = error if storage else f"storage failed on process {stuck_on[0]}"
                raise UserError(f"checkpoint {step} in {self.directory} could not be read after "
                                f"{len(RETRY_DELAYS_S) + 1} attempts ({reason}): the storage failed, not the "
                                "checkpoint, so it was left in place; rerun when the storage is back (or move "
                                f"checkpoints/{step} aside to resume from an older checkpoint)")
            bad_on = processes_where(error is not None)
            if bad_on:
                failed.append((step, error or f"a shard failed to read on process {bad_on[0]}"))
                continue
            for bad, reason in failed:
                where = self.quarantine(bad)
                warn(f"checkpoint {bad} is unreadable ({reason}); moved to {where}, resuming from step {step}")
            state, extra = restored
            return state, extra, step
        step, reason = failed[0]
        raise UserError(f"no checkpoint in {self.directory} can be restored (step {step}: {reason}); if the model "
                        "or optimizer changed, use the original config or start over with --fresh")

    def _restore_retrying(self, step: int, target: Any,
                          warn: Callable[[str], None]) -> tuple[tuple[Any, dict] | None, str | None, bool]:
        """(restored, None, False); or (None, why, storage?) once the data proved damaged or the storage
        failed on every attempt. Local to this process: no collective waits inside the retries."""
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=2):
            try:
                with _quiet_async_leftovers():
                    return self.restore(step, target), None, False
            except Exception as e:
                storage = read_failure_in_storage(e)
                if storage is None:
                    return None, _first_line(e), False
                if delay is None:
                    return None, storage, True
                warn(f"checkpoint {step}: reading it failed in the storage ({storage}); retrying in {delay:g} s "
                     f"(attempt {attempt} of {len(RETRY_DELAYS_S) + 1})")
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns")

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


# Which failures mean the checkpoint itself is damaged, and which mean the storage failed to read it.
# Damaged (moved aside, never retried): bytes that do not match their index (TensorStore OUT_OF_RANGE, e.g. a
# truncated file), a failed checksum or decode (DATA_LOSS), a file, array or directory that is missing or of the
# wrong kind (NOT_FOUND, FileNotFoundError, ENOENT / ENOTDIR / EISDIR), metadata that does not parse
# (JSONDecodeError), a tree that does not match the target, and anything not listed below.
# Storage (retried, then a UserError, never moved): any other OSError from Python (timeouts, EIO, ESTALE,
# ENOTCONN from a dead fuse mount, permissions, no space), TensorStore's status codes for service trouble, and
# TensorStore's FAILED_PRECONDITION "[OS error: ...]" for a failed system call on a local or fuse file
# (tensorstore/internal/os/error_code.cc maps most errnos, EIO and ETIMEDOUT included, to FAILED_PRECONDITION).
_STORAGE_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "RESOURCE_EXHAUSTED",
                   "PERMISSION_DENIED", "UNAUTHENTICATED")
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
_TS_STATUS = re.compile(r"^([A-Z_]+): ")
_TS_OS_ERROR = re.compile(r"\[OS error: ([^\]]+)\]")


def read_failure_in_storage(exc: BaseException) -> str | None:
    """One line naming the storage failure behind a failed restore, or None when the checkpoint's data is at
    fault. Orbax wraps the reader's error (in exception chains and groups): every link is looked at."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno not in _MISSING_ERRNOS:
            return _first_line(e)
        text = str(e)
        status = _TS_STATUS.match(text)
        if status and status.group(1) in _STORAGE_STATUS:
            return _first_line(e)
        os_error = _TS_OS_ERROR.search(text)
        if os_error and os_error.group(1) not in {os.strerror(n) for n in _MISSING_ERRNOS}:
            return f"{type(e).__name__}: [OS error: {os_error.group(1)}] {text[:120]}"
    return None


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

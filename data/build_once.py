"""One builder per cache folder on a multi-host run, the other processes waiting for it.

Why: every process of a run needs the same cached rows, and building them is minutes of work for a large corpus.
When the processes share the cache folder (one machine, or a shared file system) the lowest-numbered process that
lacks the cache builds it; where they do not (each host its own disk), the first such process of each group that
sees the same folder builds. Which processes see the same folder is found out, not configured: each writes a probe
file named by a token process 0 shares, and looks for the others'.

Waiting is a loop of short collectives (one small all-gather per poll) while the builders work in a thread: no
collective spans the whole build, so no timeout of JAX's collectives or its coordination service limits how long a
build may take. If a builder fails, every process leaves with that builder's one-line error (a UserError stays a
UserError) instead of waiting for ever. With one process all of this is `if not ready(): build(None)`.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from parallel.errors import UserError

POLL_S = 2.0  # longest pause between two status all-gathers while a build runs
WAITING, BUILDING, BUILT, FAILED_USER, FAILED = range(5)


def process_count() -> int:
    """Processes of this run: 1 unless JAX is imported (and then as jax.distributed set it up)."""
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None else 1


def process_index() -> int:
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


def build_once(ready: Callable[[], bool], build: Callable[[threading.Event | None], None], folder: Path,
               what: str, log: Callable[[str], None]) -> None:
    """Make ready() true on every process, building on as few processes as the file systems allow.

    Every process calls this at the same point. build(stop) writes what ready() checks; with several processes it
    runs in a thread and must return (raising) soon after `stop` is set. folder: where the cache goes (probe files
    are written there for a moment). what: the thing built, for messages."""
    if process_count() == 1:
        if not ready():
            build(None)
        return
    from parallel.hosts import processes_where

    me = process_index()
    missing = processes_where(not ready())
    if not missing:
        return
    group = _same_folder(folder)
    while missing:  # each round, the lowest process of every group that still lacks the cache builds it
        builder = min(set(group) & set(missing)) if me in missing else None
        if builder == me:
            _build_and_wait(build, what)
        else:
            if builder is not None:
                log(f"process {me} waits for process {builder} to build {what}")
            _build_and_wait(None, what)
        before, missing = missing, processes_where(not ready())
        if missing == before:  # (every process sees the same lists: all stop here together)
            raise RuntimeError(f"{what} was built, yet processes {missing} still lack it")


def _same_folder(folder: Path) -> list[int]:
    """The processes that see this process's `folder` (itself included): probe files, named by a shared token."""
    from jax.experimental import multihost_utils

    from parallel.hosts import barrier

    token_bytes = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(token_bytes)).astype(np.uint8)).hex()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{token}-{process_index()}"
    probe.touch()
    try:
        barrier(f"cache-probe-{token}")  # every probe is written before any process looks
        group = [i for i in range(process_count()) if (folder / f".probe-{token}-{i}").exists()]
        barrier(f"cache-probe-read-{token}")  # every process has looked before any probe goes
    finally:
        probe.unlink(missing_ok=True)
    return group


def _build_and_wait(build: Callable[[threading.Event], None] | None, what: str) -> None:
    """Run `build` (None: nothing here) in a thread while polling every process's status; raise what failed."""
    outcome: dict[str, BaseException] = {}
    stop = threading.Event()
    thread = None
    if build is not None:
        def work():
            try:
                build(stop)
            except BaseException as e:  # noqa: BLE001 - reported to every process, then raised here
                outcome["error"] = e

        thread = threading.Thread(target=work, name="meshforge-cache-build", daemon=True)
        thread.start()
    pause = 0.05
    try:
        while True:
            if thread is not None:
                thread.join(pause)
            else:
                time.sleep(pause)
            pause = min(2 * pause, POLL_S)
            statuses = _gather(_status(thread, outcome))
            failed = np.flatnonzero(statuses >= FAILED_USER)
            if len(failed) or not (statuses == BUILDING).any():
                break
    except BaseException:
        stop.set()
        if thread is not None:
            thread.join()
        raise
    if not len(failed):
        return
    if thread is not None and thread.is_alive():  # another builder failed: this one stops and cleans up
        stop.set()
        thread.join()
    first = int(failed[0])
    message = _share_text(str(outcome.get("error", "")), first)
    if first == process_index():
        raise outcome["error"]
    if statuses[first] == FAILED_USER:
        raise UserError(message)
    raise RuntimeError(f"process {first} failed to build {what}: {message}")


def _status(thread: threading.Thread | None, outcome: dict) -> int:
    if thread is None:
        return WAITING
    if thread.is_alive():
        return BUILDING
    if "error" not in outcome:
        return BUILT
    return FAILED_USER if isinstance(outcome["error"], UserError) else FAILED


def _gather(status: int) -> np.ndarray:
    """Every process's status, by process index."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.array([status], np.int32))).reshape(-1)


def _share_text(text: str, source: int) -> str:
    """Process `source`'s text, on every process."""
    from jax.experimental import multihost_utils

    is_source = process_index() == source
    data = text.encode() if is_source else b""
    n = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int32), is_source=is_source))
    if n == 0:
        return ""
    buf = np.frombuffer(data, np.uint8) if is_source else np.zeros(n, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=is_source)).astype(np.uint8)).decode()

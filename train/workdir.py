"""Run-directory hygiene: one writer at a time, writability checked up front, old runs archived, never deleted."""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from parallel.errors import UserError

RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "tb", "checkpoints", "wandb",
             "wandb_id.txt")


class StorageError(UserError):
    """The workdir cannot be written (full disk, read-only, permissions); the last valid checkpoint is kept."""


_REASONS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
            errno.EACCES: "Permission denied", errno.EPERM: "Operation not permitted",
            errno.EDQUOT: "Disk quota exceeded"}


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """exc and every exception behind it (causes, contexts, members of exception groups), each once: Orbax and
    TensorStore wrap the error that matters in their own types."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


def storage_failure_reason(e: BaseException | None) -> str | None:
    """The write-side storage problem (full, read-only, no permission) behind an exception."""
    for link in exception_chain(e):
        if isinstance(link, OSError) and link.errno in _REASONS:
            return _REASONS[link.errno]
        for reason in _REASONS.values():
            if reason in str(link):
                return reason
    return None


def is_storage_failure(e: BaseException) -> bool:
    return storage_failure_reason(e) is not None


def storage_error(workdir: Path, e: BaseException, last_step: int | None) -> StorageError:
    keep = f"the last valid checkpoint is step {last_step}" if last_step is not None else "no checkpoint was lost"
    return StorageError(f"cannot write to {workdir}: {storage_failure_reason(e)}; {keep}. Free space or fix "
                        "permissions, then rerun the same command to resume")


class RunLock:
    """An exclusive flock on WORKDIR/.lock for the lifetime of a run; released by the OS if the process dies."""

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncates the holder's note
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another meshforge run ({holder}); wait for it to "
                            "finish or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the note names the current holder only
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def ensure_writable(workdir: Path) -> bool:
    """Create the workdir if needed and prove a file can be written there. Returns True if it was created."""
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--workdir {workdir} is not writable ({e.strerror}); choose a writable directory") from None
    return created


def archive_run(workdir: Path) -> Path | None:
    """Move an earlier run's files aside (for --fresh): WORKDIR/archive/<timestamp>/. Nothing is deleted."""
    present = [workdir / n for n in RUN_FILES if (workdir / n).exists()]
    if not present:
        return None
    dest = workdir / "archive" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for p in present:
        shutil.move(str(p), dest / p.name)
    return dest

"""A read error from storage (a timeout, EIO, a network filesystem hiccup) is retried, and never taken for a
damaged checkpoint: only data that fails its integrity check is moved aside. Real Orbax checkpoints; the faults
are injected where Orbax's Python code opens files (its metadata reads through etils.epath use builtins.open)."""
import builtins
import errno
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel.errors import UserError
from train import checkpoint
from train.checkpoint import Checkpointer

STEPS = (1, 2)


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.01, 0.02, 0.04), raising=False)  # real waits: seconds
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    for step in STEPS:
        state = {"w": jnp.full((4, 8), float(step)), "count": jnp.array(step, jnp.int32)}
        ckpt.save(step, state, {"data": {"step": step}})
    ckpt.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    yield ckpt, target, tmp_path
    ckpt.close()


def fail_opens(monkeypatch, under: Path, times: int, code: int = errno.ETIMEDOUT) -> list[str]:
    """The next `times` opens of a file below `under` raise OSError(code), as a stalled network mount does."""
    real, failed = builtins.open, []

    def flaky_open(file, *args, **kwargs):
        if str(file).startswith(str(under)) and len(failed) < times:
            failed.append(str(file))
            raise OSError(code, os.strerror(code), str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky_open)
    return failed


def restore(ckpt, target):
    warnings: list[str] = []
    state, extra, step = ckpt.restore_latest_valid(target, warn=warnings.append)
    return state, extra, step, warnings


@pytest.mark.parametrize("code", [errno.ETIMEDOUT, errno.EIO])
def test_a_transient_read_error_is_retried_not_quarantined(saved, monkeypatch, code):
    ckpt, target, root = saved
    failed = fail_opens(monkeypatch, root / "checkpoints" / "2", times=2, code=code)
    state, extra, step, warnings = restore(ckpt, target)
    assert not (root / "corrupt_checkpoints").exists() and (root / "checkpoints" / "2").is_dir()
    assert step == 2 and extra["data"]["step"] == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 8), 2.0))
    assert len(failed) == 2  # the fault really hit Orbax's reads of checkpoint 2
    assert len(warnings) == 2 and all("checkpoint 2" in w and "retrying" in w for w in warnings), warnings
    assert os.strerror(code) in warnings[0]


def test_storage_that_stays_down_stops_with_a_user_error_and_moves_nothing(saved, monkeypatch):
    ckpt, target, root = saved
    failed = fail_opens(monkeypatch, root / "checkpoints" / "2", times=10**9)
    with pytest.raises(UserError) as e:
        restore(ckpt, target)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint 2" in msg and "storage" in msg and os.strerror(errno.ETIMEDOUT) in msg
    assert len(failed) >= len(checkpoint.RETRY_DELAYS_S) + 1  # every attempt read storage again
    assert (root / "checkpoints" / "2").is_dir() and not (root / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_data_is_still_quarantined_without_retries(saved, damage):
    ckpt, target, root = saved
    files = sorted((p for p in (root / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    if damage == "truncate":
        with open(files[-1], "r+b") as f:
            f.truncate(files[-1].stat().st_size // 2)
    else:
        for p in (root / "checkpoints" / "2" / "state").rglob("manifest.ocdbt"):
            p.unlink()
    state, _, step, warnings = restore(ckpt, target)
    assert step == 1 and np.asarray(state["w"])[0, 0] == 1.0
    assert len(warnings) == 1 and "checkpoint 2 is unreadable" in warnings[0], warnings  # no retry lines
    assert [p.name for p in (root / "corrupt_checkpoints").iterdir()] == ["2"]


def test_tensorstore_errors_are_told_apart_by_status_and_os_error():
    """TensorStore (Orbax's array reader, C++) reports a failed system call on a local or fuse file as
    FAILED_PRECONDITION with "[OS error: <strerror>]" (tensorstore/internal/os/error_code.cc), and GCS trouble as
    UNAVAILABLE / DEADLINE_EXCEEDED; faults there cannot be injected from Python, so the verdicts on its
    messages are checked here, each wrapped as Orbax wraps them."""
    def wrapped(message: str) -> Exception:
        try:
            try:
                raise ValueError(message)
            except ValueError as inner:
                raise Exception("Encountered error while reading array index") from inner
        except Exception as outer:
            return outer

    where = 'Error reading "w/0.0" in OCDBT database at local file "/ckpt/2/state/"'
    storage = [f"FAILED_PRECONDITION: {where} [OS error: {os.strerror(errno.EIO)}]",
               f"FAILED_PRECONDITION: {where} [OS error: {os.strerror(errno.ENOTCONN)}]",  # a gcsfuse mount gone
               f"UNAVAILABLE: {where}", f"DEADLINE_EXCEEDED: {where}"]
    damaged = [f"OUT_OF_RANGE: {where}: Requested byte range [0, 2291) is not valid for value of size 1279",
               f"NOT_FOUND: {where} [OS error: {os.strerror(errno.ENOENT)}]", f"DATA_LOSS: {where}",
               f"FAILED_PRECONDITION: {where} [OS error: {os.strerror(errno.EISDIR)}]"]
    assert [checkpoint.read_failure_in_storage(wrapped(m)) is not None for m in storage] == [True] * len(storage)
    assert [checkpoint.read_failure_in_storage(wrapped(m)) for m in damaged] == [None] * len(damaged)
    assert checkpoint.read_failure_in_storage(TimeoutError(errno.ETIMEDOUT, "timed out")) is not None
    assert checkpoint.read_failure_in_storage(FileNotFoundError(errno.ENOENT, "gone")) is None

"""Fault injection for reliability tests: MESHFORGE_FAULTS="kill_at_step=31,nan_at_step=12".

kill_at_step=N       after dispatching step N, let checkpoint writes in flight finish, then SIGKILL itself
kill_hard_at_step=N  SIGKILL right after dispatching step N, possibly in the middle of a checkpoint write
kill_in_save_at_step=N  SIGKILL in the middle of writing the checkpoint of step N, before Orbax commits it
nan_at_step=N   the batch of step N gets NaN loss weights, so its loss and gradients are non-finite
hang_at_step=N  after dispatching step N, the main thread waits inside XLA for ever (a hung collective)
oom_at_step=N   after dispatching step N, allocate far more device memory than exists (a failed allocation)
sigterm_at_step=N  after dispatching step N, send SIGTERM to itself (a preemption notice at a known step)
Only for tests and drills; unset in normal runs.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np


class Faults:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get("MESHFORGE_FAULTS", "") if spec is None else spec
        self.at: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, value = item.partition("=")
            self.at[name] = int(value)

    def corrupt_batch(self, step: int, host_batch: dict) -> dict:
        if self.at.get("nan_at_step") == step:
            host_batch = {**host_batch, "weights": np.full_like(host_batch["weights"], np.nan)}
        return host_batch

    def after_dispatch(self, step: int, ckpt) -> None:
        """ckpt: the loop's train.checkpoint.Checkpointer."""
        if self.at.get("kill_at_step") == step:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at.get("kill_hard_at_step") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at.get("kill_in_save_at_step") == step:
            _kill_during_save(ckpt.directory, step)
        if self.at.get("oom_at_step") == step:
            import jax.numpy as jnp

            jnp.zeros((2**50,), jnp.uint8).block_until_ready()
        if self.at.get("sigterm_at_step") == step:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.at.get("hang_at_step") == step:
            _hang(f"after step {step}")


def _hang(where: str = "") -> None:
    """Block the main thread in a device computation that never ends: Python signal handlers cannot run."""
    import jax
    import jax.numpy as jnp

    # x + 1 stops changing at 2**24 in float32, so the loop never ends; XLA cannot fold it away as it would an
    # identity body
    spin = jax.jit(lambda x: jax.lax.while_loop(lambda x: x >= 0.0, lambda x: x + 1.0, x))
    x = jnp.zeros(())
    never = spin.lower(x).compile()  # compiled first: the main thread runs Python while it compiles
    print(f"meshforge: fault: hanging {where}".rstrip(), file=sys.stderr, flush=True)
    # From here on it runs no bytecode: the call itself may execute the loop on this thread (small programs on
    # one CPU device run inline), or return and leave the wait to block_until_ready.
    jax.block_until_ready(never(x))


def _kill_during_save(checkpoints: Path, step: int) -> None:
    """SIGKILL from a watcher thread once the save of `step` (which the loop starts next) has files in Orbax's
    temporary folder for it (named "<step>.<suffix>" until the commit renames it): a write cut off midway."""

    def writing() -> bool:
        try:
            return any(any(p.iterdir()) for p in checkpoints.glob(f"{step}.*") if p.is_dir())
        except OSError:  # renamed or removed while being listed
            return False

    def watch():
        while not (checkpoints / str(step)).exists() and not writing():
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)  # if the commit won the race, the test sees checkpoint `step` exist

    threading.Thread(target=watch, daemon=True).start()

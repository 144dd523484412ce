"""Fault injection for reliability tests: MESHFORGE_FAULTS="kill_at_step=31,nan_at_step=12".

kill_at_step=N       after dispatching step N, let checkpoint writes in flight finish, then SIGKILL itself
kill_hard_at_step=N  SIGKILL right after dispatching step N, possibly in the middle of a checkpoint write
nan_at_step=N   the batch of step N gets NaN loss weights, so its loss and gradients are non-finite
Only for tests and drills; unset in normal runs.
"""
from __future__ import annotations

import os
import signal

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

    def after_dispatch(self, step: int, finish_writes) -> None:
        if self.at.get("kill_at_step") == step:
            finish_writes()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at.get("kill_hard_at_step") == step:
            os.kill(os.getpid(), signal.SIGKILL)

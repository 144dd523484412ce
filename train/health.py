"""Watching a run's numerics from the per-step metrics of each log window: skipped steps and loss spikes.

The jitted step already refuses non-finite updates (optax.apply_if_finite); this decides, on the host, whether
to warn or to stop, and counts loss spikes against a running mean.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for its error type: keep it free of jax (run-exported needs none)
    from train.config import TrainConfig


SPIKE_MIN_NATS = 0.1


class TrainingHalted(Exception):
    """The run stopped itself on purpose (non-finite steps under the configured policy); not a bug."""


class RunStopped(Exception):
    """Raised by a caller's `on_eval` hook (train.loop.train) to end the run after an evaluation: a sweep pruning a
    trial. Checkpoint writes in flight finish before it reaches the caller."""


class Health:
    def __init__(self, cfg: TrainConfig, skipped_at_start: int, log: Callable[[str], None],
                 last_checkpoint: Callable[[], int | None]):
        self.cfg, self.log, self.last_checkpoint = cfg, log, last_checkpoint
        self.skipped = skipped_at_start
        self.spikes = 0
        self.loss_ema: float | None = None

    def check(self, first_step: int, window: list[dict]) -> None:
        for offset, m in enumerate(window):
            step = first_step + offset
            loss = float(m["loss"])
            skipped = int(m["skipped_steps"])
            if skipped > self.skipped or not math.isfinite(loss):
                self.log(f"meshforge: warning: step {step}: non-finite loss or gradients; update skipped "
                         f"({skipped} skipped so far)")
                if self.cfg.nonfinite == "stop":
                    self._halt(f"non-finite loss or gradients at step {step} (train.nonfinite=stop)")
            self.skipped = skipped
            if int(m["nonfinite_in_a_row"]) > self.cfg.max_nonfinite_in_a_row:
                self._halt(f"{int(m['nonfinite_in_a_row'])} non-finite steps in a row up to step {step} "
                           f"(train.max_nonfinite_in_a_row={self.cfg.max_nonfinite_in_a_row})")
            if math.isfinite(loss):
                # Relative *and* absolute: near zero loss, 0.001 -> 0.004 is a factor of 4 but no spike.
                if (self.cfg.spike_factor and self.loss_ema is not None
                        and loss > self.cfg.spike_factor * self.loss_ema and loss - self.loss_ema > SPIKE_MIN_NATS):
                    self.spikes += 1
                    self.log(f"meshforge: warning: loss spike at step {step}: {loss:.4f} "
                             f"(running mean {self.loss_ema:.4f})")
                self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss

    def _halt(self, why: str) -> None:
        raise TrainingHalted(f"{why}; the last checkpoint is step {self.last_checkpoint()}. Lower optim.lr or "
                             "inspect the data around that step, then rerun to resume")

"""Host-side numerics policy: skipped steps reported, 'stop' halts, loss spikes counted (relative and absolute)."""
import math

import pytest

from train.config import TrainConfig
from train.health import Health, TrainingHalted


def _window(losses, skipped):
    return [{"loss": l, "skipped_steps": s, "nonfinite_in_a_row": 0} for l, s in zip(losses, skipped)]


def test_spikes_need_a_relative_and_an_absolute_jump():
    logs = []
    h = Health(TrainConfig(spike_factor=3.0), 0, logs.append, lambda: 10)
    h.check(1, _window([2.0] * 20 + [7.0] + [2.0] * 5, [0] * 26))
    assert h.spikes == 1 and "loss spike at step 21" in logs[0]
    quiet = Health(TrainConfig(spike_factor=3.0), 0, logs.append, lambda: 10)
    quiet.check(1, _window([0.001] * 20 + [0.01], [0] * 21))  # 10x, but only 0.009 nats
    assert quiet.spikes == 0


def test_skipped_steps_are_reported_and_stop_halts():
    logs = []
    h = Health(TrainConfig(), 0, logs.append, lambda: 10)
    h.check(1, _window([2.0, math.nan, 2.0], [0, 1, 1]))
    assert h.skipped == 1 and len(logs) == 1 and "step 2: non-finite" in logs[0]
    stop = Health(TrainConfig(nonfinite="stop"), 0, logs.append, lambda: 10)
    with pytest.raises(TrainingHalted, match="step 2 .*last checkpoint is step 10"):
        stop.check(1, _window([2.0, math.nan], [0, 1]))


def test_too_many_in_a_row_halts():
    h = Health(TrainConfig(max_nonfinite_in_a_row=2), 0, lambda m: None, lambda: None)
    window = [{"loss": math.nan, "skipped_steps": i + 1, "nonfinite_in_a_row": i + 1} for i in range(3)]
    with pytest.raises(TrainingHalted, match="3 non-finite steps in a row"):
        h.check(1, window)

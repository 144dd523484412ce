"""`meshforge plan`: the 6ND arithmetic against a hand computation, the experiment's own FLOP count, and --measure
timing the step on this CPU."""
from __future__ import annotations

import json

import jax
import pytest

from lab.plan import count_model_params
from helpers import TINY, meshforge
from train.accounting import train_flops_per_token
from train.state import model_def


def test_plan_for_a_parameter_count_matches_the_hand_computation(tmp_path):
    out = tmp_path / "plan.json"
    r = meshforge("plan", "--params", "1e9", "--hardware", "v5p-256", "--tokens", "2e10", "--mfu", "0.5",
                  "--json", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    # By hand: v5p-256 is 128 chips (the name counts TensorCores) of 459 TFLOP/s bf16, 350 W, $4.20/chip-hour.
    flops = 6 * 1e9 * 2e10  # 6ND = 1.2e20
    seconds = flops / (128 * 459e12 * 0.5)  # 4,084.97 s
    hours = seconds / 3600  # 1.134713 h
    assert got["flops_per_token"] == 6e9 and got["params"] == 1_000_000_000
    assert got["hours"] == pytest.approx(1.134713, rel=1e-6)
    assert got["hours"] == pytest.approx(hours, rel=1e-12)
    assert got["chip_hours"] == pytest.approx(128 * hours, rel=1e-12)  # 145.24
    assert got["energy_kwh"] == pytest.approx(128 * hours * 350 / 1000, rel=1e-12)  # 50.83 kWh
    assert got["co2e_kg"] == pytest.approx(128 * hours * 0.350 * 1.1 * 481 / 1000, rel=1e-12)  # PUE 1.1, world
    assert got["cost_usd"] == pytest.approx(128 * hours * 4.20, rel=1e-12)  # $610.0
    assert got["compute_optimal_tokens"] == 2e10  # 20 tokens per parameter
    assert got["budget_optimal_params"] == pytest.approx((1.2e20 / 120) ** 0.5)  # 1e9: this plan is optimal
    assert "v5p x 128" in r.stdout and "chip-hours" in r.stdout


def test_plan_from_an_experiment_counts_its_flops_and_applies_accounting_overrides(tmp_path):
    out = tmp_path / "plan.json"
    r = meshforge("plan", "experiments/shakespeare_char.py", "--hardware", "h100-8", "--mfu", "0.25",
                  "--accounting.region", "france", "--accounting.usd_per_chip_hour", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    tokens = 2000 * 12 * 64  # the experiment's steps x batch x seq_len
    assert got["tokens"] == tokens
    assert got["hours"] == pytest.approx(tokens * got["flops_per_token"] / (8 * 989e12 * 0.25) / 3600, rel=1e-12)
    assert got["co2e_kg"] == pytest.approx(got["energy_kwh"] * 1.1 * 56 / 1000, rel=1e-12)
    assert got["cost_usd"] == pytest.approx(got["chip_hours"] * 2, rel=1e-12)


def test_parameter_count_from_shapes_equals_an_initialised_model():
    mdef = model_def(TINY)
    initialised = sum(x.size for x in jax.tree.leaves(mdef.init_params(0)))
    assert count_model_params(TINY) == initialised
    assert train_flops_per_token(TINY, 16) > 6 * (initialised - TINY.vocab_size * TINY.d_model)


def test_measure_times_the_step_here(tmp_path):
    out = tmp_path / "plan.json"
    r = meshforge("plan", "experiments/shakespeare_char.py", "--measure", "--model.n_layers", "1",
                  "--model.d_model", "32", "--model.n_heads", "2", "--train.batch_size", "4", "--train.seq_len",
                  "16", "--train.steps", "100", "--json", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["hardware"].startswith("cpu x") and got["mfu"] is None and got["tokens_per_s"] > 0
    assert got["hours"] == pytest.approx(100 * 4 * 16 / got["tokens_per_s"] / 3600, rel=1e-9)


@pytest.mark.parametrize("args, says", [
    (["--params", "1e9", "--hardware", "v9-8"], "--hardware: unknown chip 'v9'"),
    (["--params", "1e9", "--hardware", "v5p"], "NAME-COUNT"),
    (["--params", "1e9"], "--hardware: give the machine"),
    (["--params", "1e9", "--hardware", "h100-8", "--mfu", "2"], "--mfu"),
    (["--params", "1e9", "--measure"], "--measure"),
    (["--params", "1e9", "--hardware", "h100-8", "--model.d_model", "64"], "only accounting.* settings apply"),
    (["--params", "1e9", "--hardware", "h100-8", "--accounting.region", "mars"], "accounting.region"),
])
def test_bad_plan_input_is_one_line_and_exit_2(args, says):
    r = meshforge("plan", *args)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

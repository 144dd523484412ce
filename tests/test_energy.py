"""Energy, carbon and cost accounting (train/energy.py, train/hardware.py): the arithmetic against hand
computations with a fake power table, RAPL counters read from a fake sysfs tree, and a real run's summary whose
totals add up and survive a resume."""
from __future__ import annotations

import dataclasses
import json
import types

import pytest

from parallel.errors import UserError
from helpers import meshforge
from train.energy import AccountingConfig, EnergyMeter, Rapl
from train.hardware import CHIPS, chip_for_kind, parse_hardware


def fake_devices(kind: str, platform: str, n: int) -> list:
    return [types.SimpleNamespace(device_kind=kind, platform=platform, id=i) for i in range(n)]


def test_modelled_accelerator_energy_carbon_and_cost_by_hand():
    cfg = AccountingConfig(pue=1.25, carbon_intensity=400.0, carbon_source="test grid", chip_watts=250.0,
                           idle_fraction=0.2, usd_per_chip_hour=3.0)
    meter = EnergyMeter(cfg, started=0.0, devices=fake_devices("TPU v5 lite", "tpu", 4), counters=False)
    got = meter.totals(busy_s=5400.0, now=7200.0)  # 2 h wall, 1.5 h of it in steps
    chip_h, busy_h = 4 * 2.0, 4 * 1.5
    kwh = 250.0 * (busy_h + 0.2 * (chip_h - busy_h)) / 1000  # 1.5 + 0.1 = 1.6 kWh
    assert got["chip_hours"] == pytest.approx(chip_h, rel=1e-12)
    assert got["chip_hours_busy"] == pytest.approx(busy_h, rel=1e-12)
    assert got["energy_kwh_accelerators"] == pytest.approx(kwh, rel=1e-12)
    assert got["energy_kwh_cpu"] == 0.0  # no RAPL read (counters off) and an accelerator run: left out
    assert got["energy_kwh"] == pytest.approx(kwh, rel=1e-12)
    assert got["co2e_kg"] == pytest.approx(kwh * 1.25 * 400.0 / 1000, rel=1e-12)
    assert got["cost_usd"] == pytest.approx(chip_h * 3.0, rel=1e-12)
    described = meter.describe()
    assert described["chip"] == "v5e" and described["carbon_source"] == "test grid"
    assert described["energy_method_accelerators"].startswith("modelled: 4 x 250 W")
    assert described["energy_method_cpu"].startswith("not counted")


def test_cpu_run_models_one_chip_per_core_from_the_table():
    meter = EnergyMeter(AccountingConfig(region="france"), started=0.0, devices=fake_devices("cpu", "cpu", 8),
                        counters=False)
    cores = meter.chips  # the cores this process may use, not the 8 virtual devices
    got = meter.totals(busy_s=3600.0, now=3600.0)
    table = chip_for_kind("cpu", "cpu")
    assert got["energy_kwh_cpu"] == pytest.approx(cores * table.watts / 1000, rel=1e-12)
    assert got["co2e_kg"] == pytest.approx(got["energy_kwh"] * 1.1 * 56.0 / 1000, rel=1e-12)
    assert got["cost_usd"] == pytest.approx(cores * table.usd_per_hour, rel=1e-12)


def test_prior_totals_are_added_and_unknown_chips_leave_cost_open():
    meter = EnergyMeter(AccountingConfig(), started=0.0, prior={"energy_kwh": 2.0, "chip_hours": 1.0},
                        devices=fake_devices("Some New Chip", "gpu", 1), counters=False)
    got = meter.totals(busy_s=0.0, now=3600.0)
    assert got["chip_hours"] == pytest.approx(2.0)
    assert got["energy_kwh"] == pytest.approx(2.0 + 0.3 * 300 / 1000)  # idle at the 300 W fallback
    assert got["cost_usd"] is None
    assert "unknown" in meter.describe()["price_source"]


def test_rapl_counters_sum_packages_and_unwrap(tmp_path):
    for pkg, start in (("intel-rapl:0", 1_000), ("intel-rapl:1", 5_000)):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "energy_uj").write_text(str(start))
        (tmp_path / pkg / "max_energy_range_uj").write_text("10000")
        (tmp_path / pkg / "name").write_text(f"package-{pkg[-1]}\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-domain (core): inside package 0, not counted twice
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("0")
    (tmp_path / "intel-rapl:2").mkdir()  # psys (client CPUs): contains the packages, not counted twice
    (tmp_path / "intel-rapl:2" / "energy_uj").write_text("0")
    (tmp_path / "intel-rapl:2" / "name").write_text("psys\n")
    rapl = Rapl(str(tmp_path))
    assert [p.name for p in rapl.paths] == ["intel-rapl:0", "intel-rapl:1"]
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000")  # +2,000 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("1000")  # wrapped: +6,000 uJ
    assert rapl.joules() == pytest.approx(0.008)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("4000")
    assert rapl.joules() == pytest.approx(0.009)


def test_bad_accounting_settings_name_the_field():
    with pytest.raises(UserError, match="accounting.region"):
        AccountingConfig(region="atlantis")
    with pytest.raises(ValueError, match="accounting.pue"):
        AccountingConfig(pue=0.9)
    with pytest.raises(UserError, match="--hardware"):
        parse_hardware("v9x-8")
    with pytest.raises(UserError, match="TensorCores"):
        parse_hardware("v5p-3")
    with pytest.raises(UserError, match="at least 1"):
        parse_hardware("h100-0")


def test_hardware_names_count_chips_as_the_cloud_does():
    assert parse_hardware("v5p-256")[1] == 128  # v4/v5p slice names count TensorCores, two per chip
    assert parse_hardware("v5e-64")[1] == 64 and parse_hardware("v5litepod-16")[1] == 16
    assert parse_hardware("h100-8") == (next(c for c in CHIPS if c.name == "h100"), 8)
    assert chip_for_kind("NVIDIA H100 PCIe", "gpu").name == "h100-pcie"
    assert chip_for_kind("TPU v5 lite", "tpu").name == "v5e" and chip_for_kind("TPU v5", "tpu").name == "v5p"


TINY_RUN = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--train.batch_size", "4",
            "--train.seq_len", "16", "--train.eval_batches", "1", "--train.log_every", "2", "--log.tensorboard",
            "false"]


def test_a_run_accounts_energy_in_summary_and_metrics_and_keeps_it_across_a_resume(tmp_path):
    wd = tmp_path / "run"
    common = ["train", "experiments/shakespeare_char.py", "--workdir", str(wd), *TINY_RUN,
              "--train.eval_every", "4", "--train.checkpoint_every", "4", "--accounting.region", "germany"]
    r = meshforge(*common, "--train.steps", "4")
    assert r.returncode == 0, r.stderr
    first = json.loads((wd / "summary.json").read_text())
    r = meshforge(*common, "--train.steps", "8")
    assert r.returncode == 0, r.stderr
    s = json.loads((wd / "summary.json").read_text())
    assert s["energy_method_cpu"].startswith(("modelled", "measured: RAPL"))
    assert s["energy_kwh"] == pytest.approx(s["energy_kwh_cpu"] + s["energy_kwh_accelerators"], rel=1e-12)
    assert s["co2e_kg"] == pytest.approx(s["energy_kwh"] * s["pue"] * 381.0 / 1000, rel=1e-12)
    assert s["cost_usd"] == pytest.approx(s["chip_hours"] * s["usd_per_chip_hour"], rel=1e-9)
    assert 0 < s["chip_hours_busy"] < s["chip_hours"]
    # The resumed run continues the first one's totals (its last checkpoint's): more than either run alone.
    assert s["chip_hours"] > first["chip_hours"] + s["chips_per_host"] * (s["wall_s"] - 1) / 3600 * 0.5
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    energy = [x["energy_kwh"] for x in rows if "energy_kwh" in x]
    assert len(energy) == 4 and energy == sorted(energy) and energy[-1] <= s["energy_kwh"]


def test_config_round_trips_the_accounting_section():
    from train.config import Config, from_dict

    cfg = dataclasses.replace(Config(), accounting=AccountingConfig(pue=1.3, carbon_intensity=12.0))
    assert from_dict(json.loads(cfg.to_json())).accounting == cfg.accounting


def test_nvml_counters_follow_cuda_visible_devices(monkeypatch):
    """NVML cannot run here (no NVIDIA driver: Nvml.open gives None, the run models its energy); a stand-in with
    NVML's calls checks the mJ arithmetic and the CUDA -> NVML device numbering."""
    from train.energy import Nvml

    try:
        __import__("pynvml").nvmlInit()
    except Exception:  # no NVIDIA driver here (nvidia-ml-py may be installed): the run models its energy instead
        assert Nvml.open(fake_devices("NVIDIA H100 80GB HBM3", "gpu", 1)) is None
    energy_mj = {"GPU-aaa": 1_000, 3: 5_000}

    class FakeNvml:
        @staticmethod
        def nvmlInit():
            pass

        nvmlDeviceGetHandleByUUID = staticmethod(lambda uuid: uuid)
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: i)
        nvmlDeviceGetTotalEnergyConsumption = staticmethod(lambda h: energy_mj[h])

    monkeypatch.setitem(__import__("sys").modules, "pynvml", FakeNvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,3")
    nvml = Nvml(fake_devices("NVIDIA H100", "gpu", 2))
    energy_mj["GPU-aaa"] += 2_500
    energy_mj[3] += 500
    assert nvml.joules() == pytest.approx(3.0)

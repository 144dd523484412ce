"""A run's chip-hours, energy, carbon and cost, totalled over its hosts and carried across resumes.

Energy has one entry per component, each with the method that produced it:
- accelerators: NVIDIA GPUs are measured with NVML's energy counters (`nvidia-ml-py`, the `energy` extra); other
  accelerators (TPUs) are modelled from the chip table (train/hardware.py): watts x busy chip-hours plus
  accounting.idle_fraction x watts x idle chip-hours;
- cpu: measured with the RAPL package counters (/sys/class/powercap, readable on bare-metal Linux, rarely in a
  VM; they count the whole package, other processes included); otherwise, on a CPU-only run, modelled like a chip
  with one "chip" per core this process may use; on an accelerator run an unreadable CPU is left out and says so.
Busy time is time in train steps; the rest of the wall time (start-up, compilation, evaluation, checkpoint
waits) is idle. CO2e = energy x PUE x grid intensity; cost = chip-hours x price per chip-hour (clouds bill the
wall time, busy or not). Each host measures itself; every log row sums the hosts (one small all-gather).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from train.hardware import UNKNOWN_CHIP, carbon_intensity, chip_for_kind

# Totals a log row carries (and the summary's last value of each); checkpoints keep them for the resumed run.
TOTALS = ("chip_hours", "chip_hours_busy", "energy_kwh_accelerators", "energy_kwh_cpu", "energy_kwh", "co2e_kg",
          "cost_usd")


@dataclasses.dataclass(frozen=True)
class AccountingConfig:
    pue: float = 1.1  # facility energy / IT energy: hyperscale data centres report 1.1, a desk 1.0
    region: str = "world"  # grid carbon intensity from train/hardware.py's table (2023 annual averages)
    carbon_intensity: float = 0.0  # gCO2e/kWh; > 0 overrides the region's value
    carbon_source: str = ""  # where carbon_intensity comes from, recorded beside it
    chip_watts: float = 0.0  # > 0 overrides the chip table's power per chip (per core on CPU)
    idle_fraction: float = 0.3  # modelled power of an idle chip, as a fraction of its busy power
    usd_per_chip_hour: float = 0.0  # > 0 overrides the table's on-demand list price (per core-hour on CPU)
    measure: Literal["auto", "model"] = "auto"  # model: use the tables even where counters are readable

    def __post_init__(self):
        if self.pue < 1.0:
            raise ValueError(f"accounting.pue must be >= 1 (facility over IT energy), got {self.pue}")
        if not 0.0 <= self.idle_fraction <= 1.0:
            raise ValueError(f"accounting.idle_fraction must be in [0, 1], got {self.idle_fraction}")
        for name in ("carbon_intensity", "chip_watts", "usd_per_chip_hour"):
            if getattr(self, name) < 0:
                raise ValueError(f"accounting.{name} must be >= 0 (0: the table's value), got {getattr(self, name)}")
        carbon_intensity(self.region, self.carbon_intensity, self.carbon_source)  # an unknown region fails now


class Rapl:
    """Joules since construction from the RAPL package counters, unwrapped. The counters wrap at
    max_energy_range_uj (about 262 kJ: 20 minutes at 200 W), so a thread also reads them every SAMPLE_S seconds:
    log rows may be further apart than that. Only the package zones count (a client CPU's psys zone contains the
    package: counting both would count it twice)."""

    method = "measured: RAPL package counters"
    SAMPLE_S = 60.0

    def __init__(self, root: str = "/sys/class/powercap"):
        zones = [Path(p) for p in sorted(glob.glob(f"{root}/intel-rapl:[0-9]*")) if ":" not in Path(p).name[11:]]
        self.paths = [p for p in zones if zone_name(p).startswith("package")]
        self.last = [self._read(p) for p in self.paths]
        self.total_uj = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def start_sampling(self) -> Rapl:
        threading.Thread(target=self._sample, name="meshforge-rapl", daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self.stopped.wait(self.SAMPLE_S):
            try:
                self.joules()
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()

    @staticmethod
    def _read(path: Path) -> int:
        return int((path / "energy_uj").read_text())

    @classmethod
    def open(cls) -> Rapl | None:
        try:
            rapl = cls()
        except (OSError, ValueError):
            return None
        return rapl.start_sampling() if rapl.paths else None

    def joules(self) -> float:
        with self.lock:
            for i, path in enumerate(self.paths):
                now = self._read(path)
                delta = now - self.last[i]
                if delta < 0:  # the counter wrapped
                    delta += int((path / "max_energy_range_uj").read_text())
                self.total_uj += delta
                self.last[i] = now
            return self.total_uj / 1e6


def zone_name(path: Path) -> str:
    try:
        return (path / "name").read_text().strip()
    except OSError:
        return "package"  # a zone without a name file: old kernels name only packages


class Nvml:
    """Joules since construction of this process's NVIDIA GPUs (NVML's total-energy counters, in mJ)."""

    method = "measured: NVML energy counters"

    def __init__(self, devices: list):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [nvml_handle(pynvml, int(getattr(d, "local_hardware_id", d.id))) for d in devices]
        self.start = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]

    @classmethod
    def open(cls, devices: list) -> Nvml | None:
        try:
            return cls(devices)
        except Exception:  # no nvidia-ml-py, no driver, or a GPU without the counter (pre-Volta)
            return None

    def joules(self) -> float:
        now = [self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        return sum(b - a for a, b in zip(self.start, now)) / 1e3


def nvml_handle(pynvml, ordinal: int):
    """NVML's handle of CUDA device `ordinal`. NVML numbers every GPU of the machine, CUDA only the visible ones:
    CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs) maps one onto the other."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ordinal < len(visible):
        v = visible[ordinal]
        return pynvml.nvmlDeviceGetHandleByUUID(v) if v.startswith(("GPU-", "MIG-")) else \
            pynvml.nvmlDeviceGetHandleByIndex(int(v))
    return pynvml.nvmlDeviceGetHandleByIndex(ordinal)


class EnergyMeter:
    """This process's figures since `started`, summed over processes, plus the totals of the sessions before a
    resume (`prior`). The host's CPU (its cores, its RAPL counters) is counted by one process per host, the
    accelerators by the process that drives them. Create it where the command starts: counters count from here."""

    def __init__(self, cfg: AccountingConfig, started: float, prior: dict | None = None,
                 devices: list | None = None, counters: bool = True):
        devices = devices if devices is not None else jax.local_devices()
        platform = devices[0].platform
        self.cfg, self.started, self.prior = cfg, started, dict(prior or {})
        self.on_cpu = platform == "cpu"
        self.counts_host = first_on_host()
        self.chip = chip_for_kind(devices[0].device_kind, platform) or UNKNOWN_CHIP
        self.chips = (len(os.sched_getaffinity(0)) * self.counts_host) if self.on_cpu else len(devices)
        self.watts = cfg.chip_watts or self.chip.watts
        self.price = cfg.usd_per_chip_hour or self.chip.usd_per_hour
        self.intensity, self.intensity_source = carbon_intensity(cfg.region, cfg.carbon_intensity, cfg.carbon_source)
        measure = counters and cfg.measure == "auto"
        self.rapl = Rapl.open() if measure and self.counts_host else None
        self.nvml = Nvml.open(devices) if measure and platform == "gpu" else None

    def methods(self) -> dict[str, str]:
        """How each component is obtained, for summary.json."""
        model = (f"modelled: {self.chips} x {self.watts:g} W busy, x{self.cfg.idle_fraction:g} idle "
                 f"({'accounting.chip_watts' if self.cfg.chip_watts else self.chip.watts_source})")
        out = {}
        if not self.on_cpu:
            out["energy_method_accelerators"] = self.nvml.method if self.nvml else model
        out["energy_method_cpu"] = (self.rapl.method if self.rapl else model if self.on_cpu
                                    else "not counted: no readable RAPL counters on this host")
        return out

    def describe(self) -> dict:
        """The constants behind the totals, for summary.json."""
        return {
            "chip": self.chip.name, "chips_per_host": self.chips, **self.methods(), "pue": self.cfg.pue,
            "carbon_g_per_kwh": self.intensity, "carbon_source": self.intensity_source,
            "usd_per_chip_hour": self.price or None,
            "price_source": "accounting.usd_per_chip_hour" if self.cfg.usd_per_chip_hour else
            "on-demand list price (train/hardware.py)" if self.price else "unknown: set accounting.usd_per_chip_hour",
        }

    def local(self, busy_s: float, now: float | None = None) -> np.ndarray:
        """This host's [chip_hours, busy chip-hours, accelerator kWh, cpu kWh, cost] since its start."""
        wall_h = max(0.0, ((time.perf_counter() if now is None else now) - self.started) / 3600)
        busy_h = min(busy_s / 3600, wall_h)
        chip_h, busy_chip_h = self.chips * wall_h, self.chips * busy_h
        modelled_kwh = self.watts * (busy_chip_h + self.cfg.idle_fraction * (chip_h - busy_chip_h)) / 1000
        if self.on_cpu:
            acc_kwh, cpu_kwh = 0.0, (self.rapl.joules() / 3.6e6 if self.rapl else modelled_kwh)
        else:
            acc_kwh = self.nvml.joules() / 3.6e6 if self.nvml else modelled_kwh
            cpu_kwh = self.rapl.joules() / 3.6e6 if self.rapl else 0.0
        return np.array([chip_h, busy_chip_h, acc_kwh, cpu_kwh, chip_h * self.price], np.float64)

    def totals(self, busy_s: float, now: float | None = None) -> dict[str, float]:
        """The run's totals over all processes (a collective: every process calls it at the same step)."""
        summed = self.local(busy_s, now)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # float32 on the wire (jax without x64): send each figure as float32 head + remainder
            head = summed.astype(np.float32)
            parts = np.stack([head, (summed - head).astype(np.float32)])
            gathered = np.asarray(multihost_utils.process_allgather(parts), np.float64)
            summed = gathered.reshape(-1, 2, summed.size).sum(axis=(0, 1))
        return self.add_prior(totals_from(summed, self.cfg.pue, self.intensity, bool(self.price)))

    def close(self) -> None:
        if self.rapl is not None:
            self.rapl.close()

    def add_prior(self, totals: dict[str, float]) -> dict[str, float]:
        return {k: (v + (self.prior.get(k) or 0.0) if v is not None else None) for k, v in totals.items()}


def first_on_host() -> bool:
    """Whether this process is the lowest-numbered one on its machine (a collective with several processes)."""
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    key = zlib.crc32(f"{socket.gethostname()}/{boot}".encode()) & 0x7FFFFFFF
    keys = np.asarray(multihost_utils.process_allgather(np.array([key], np.int32))).ravel()
    return int(np.flatnonzero(keys == key)[0]) == jax.process_index()


def totals_from(summed: np.ndarray, pue: float, g_per_kwh: float, priced: bool) -> dict[str, float]:
    chip_h, busy_h, acc_kwh, cpu_kwh, cost = (float(x) for x in summed)
    kwh = acc_kwh + cpu_kwh
    return {"chip_hours": chip_h, "chip_hours_busy": busy_h, "energy_kwh_accelerators": acc_kwh,
            "energy_kwh_cpu": cpu_kwh, "energy_kwh": kwh, "co2e_kg": kwh * pue * g_per_kwh / 1000,
            "cost_usd": cost if priced else None}

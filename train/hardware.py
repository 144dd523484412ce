"""What each chip can do, draws and costs: the one table behind MFU (train/accounting.py), a run's energy, carbon
and cost (train/energy.py) and `meshforge plan` (lab/plan.py).

Peak FLOP/s are vendor figures (dense, no sparsity). Power is per chip, busy: NVIDIA's board TDP; TPU v4's
published figure; the newer TPUs publish none, so theirs are estimates, marked as such, to override with
`accounting.chip_watts` when you know better. Prices are on-demand list prices per chip-hour (USD, Google Cloud
us-central, host included, as listed in 2025); committed-use and spot prices are 40-70% lower and other clouds
differ up to 3x, so set `accounting.usd_per_chip_hour` for a real budget. Carbon intensities are annual grid
averages for 2023 (Ember, via Our World in Data); set `accounting.carbon_intensity` for your provider's figure.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
from pathlib import Path

from parallel.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the name `meshforge plan --hardware NAME-COUNT` takes
    kinds: tuple[str, ...]  # substrings of jax's device_kind that mean this chip (first match wins, in table order)
    bf16_tflops: float
    fp32_tflops: float  # at JAX's DEFAULT precision: one bf16 pass on TPU, TF32 on A100/H100/H200
    watts: float
    watts_source: str
    usd_per_hour: float
    cores_in_name: int = 1  # TPU v4/v5p slice names count TensorCores, two per chip (v5p-8 is 4 chips)


CHIPS: tuple[Chip, ...] = (
    Chip("v4", ("TPU v4",), 275.0, 275.0, 192.0, "Jouppi et al. ISCA 2023 (max; mean 170 W)", 3.22, 2),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197.0, 197.0, 200.0, "estimate (no published figure)", 1.20),
    Chip("v5p", ("TPU v5p", "TPU v5"), 459.0, 459.0, 350.0, "estimate (no published figure)", 4.20, 2),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918.0, 918.0, 300.0, "estimate (no published figure)", 2.70),
    Chip("a100", ("A100",), 312.0, 156.0, 400.0, "NVIDIA A100 SXM TDP", 3.67),
    Chip("h100-pcie", ("H100 PCIe",), 756.0, 378.0, 350.0, "NVIDIA H100 PCIe TDP", 9.00),
    Chip("h100", ("H100",), 989.0, 495.0, 700.0, "NVIDIA H100 SXM TDP", 11.06),
    Chip("h200", ("H200",), 989.0, 495.0, 700.0, "NVIDIA H200 SXM TDP", 10.60),
)

# A CPU "chip" is one core: what a VM rents and what XLA's CPU devices run on. Its power is a fallback: a server
# CPU's TDP over its cores (e.g. 280 W / 28), only used where RAPL counters cannot be read.
CPU_CORE = Chip("cpu", ("cpu",), 0.0, 0.0, 10.0, "fallback: ~10 W per core (server TDP / cores)", 0.04)

UNKNOWN_CHIP = Chip("unknown", (), 0.0, 0.0, 300.0, "fallback: unknown accelerator, 300 W", 0.0)

# gCO2e per kWh, annual averages for 2023 (Ember). Pick with accounting.region; the world average by default.
CARBON_INTENSITY: dict[str, float] = {
    "world": 481.0, "us": 369.0, "china": 582.0, "india": 713.0, "germany": 381.0, "france": 56.0,
    "canada": 170.0, "brazil": 98.0, "belgium": 138.0, "finland": 79.0, "norway": 30.0, "australia": 549.0,
}
CARBON_SOURCE = "Ember 2023 annual average via Our World in Data"


def chip_for_kind(device_kind: str, platform: str) -> Chip | None:
    """The table's chip for a jax device, None for an accelerator it does not know."""
    if platform == "cpu":
        return CPU_CORE
    for chip in CHIPS:
        if any(k.lower() in device_kind.lower() for k in chip.kinds):
            return chip
    return None


def by_name(name: str, field: str = "--hardware") -> Chip:
    for chip in CHIPS + (CPU_CORE,):
        if chip.name == name.lower():
            return chip
    raise UserError(f"{field}: unknown chip {name!r}; known: {', '.join(c.name for c in CHIPS + (CPU_CORE,))}")


def parse_hardware(text: str) -> tuple[Chip, int]:
    """'v5p-256' -> (v5p, 128 chips: the suffix counts TensorCores there), 'v5e-64' or Cloud's 'v5litepod-64' ->
    (v5e, 64), 'h100-8' -> (h100, 8), 'cpu-16'."""
    m = re.fullmatch(r"([a-z0-9]+(?:-pcie)?)-(\d+)", text.strip().lower().replace("v5litepod", "v5e"))
    if not m:
        raise UserError(f"--hardware: {text!r} is not NAME-COUNT (e.g. v5p-256, v5e-64, h100-8, cpu-16); names: "
                        f"{', '.join(c.name for c in CHIPS + (CPU_CORE,))}")
    chip = by_name(m.group(1))
    count = int(m.group(2))
    if count < 1:
        raise UserError(f"--hardware: {text}: the count must be at least 1")
    if count < chip.cores_in_name or count % chip.cores_in_name:
        raise UserError(f"--hardware: {text}: {chip.name} slice names count TensorCores, {chip.cores_in_name} per "
                        f"chip; use a multiple of {chip.cores_in_name}")
    return chip, count // chip.cores_in_name


def cpu_model() -> str:
    """The CPU's model name as lscpu gives it: every benchmark names the machine its figures come from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd", "sve")


def vector_extensions() -> list[str]:
    """The CPU's vector instruction sets: what makes the same step 43 ms on one machine and 73 ms on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return [f for f in VECTOR_FLAGS if f in flags]


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def carbon_intensity(region: str, value: float, source: str) -> tuple[float, str]:
    """(gCO2e/kWh, where it came from): an explicit value wins over the region's table entry."""
    if value > 0:
        return value, source or "accounting.carbon_intensity"
    if region not in CARBON_INTENSITY:
        raise UserError(f"accounting.region: unknown region {region!r}; known: {', '.join(CARBON_INTENSITY)} "
                        "(or set accounting.carbon_intensity in gCO2e/kWh)")
    return CARBON_INTENSITY[region], f"{CARBON_SOURCE} ({region})"

"""`meshforge plan`: what a training run will take before it starts: time, chip-hours, energy, CO2e and cost.

Time = tokens x model FLOPs per token / (chips x peak FLOP/s x MFU), with the FLOPs `bench` and `train` count
(6 x matmul parameters plus causal attention; train/accounting.py), or, with --measure, the step time measured on
this machine. Energy assumes every chip busy at its table power (train/hardware.py) for the whole time; CO2e and
cost use the experiment's `accounting` section, as a run's own accounting does. The compute-optimal token count is
Chinchilla's ~20 tokens per parameter (Hoffmann et al. 2022); for the FLOP budget C = 6ND of the plan, the
compute-optimal model has N = sqrt(C / 120) parameters and D = 20 N tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from parallel.errors import UserError
from train.config import Config
from train.energy import AccountingConfig
from train.hardware import Chip, carbon_intensity, parse_hardware

TOKENS_PER_PARAM = 20  # Chinchilla


@dataclasses.dataclass(frozen=True)
class Workload:
    params: int
    flops_per_token: float
    tokens: float
    tokens_source: str


def plan(work: Workload, chip: Chip, chips: int, acct: AccountingConfig, *, mfu: float | None = None,
         tokens_per_s: float | None = None, dtype: str = "bfloat16") -> dict:
    """The plan's figures; time from the MFU and the chip's peak, or from a measured throughput."""
    if tokens_per_s is None:
        peak = 1e12 * (chip.fp32_tflops if dtype == "float32" else chip.bf16_tflops)
        if not peak:
            raise UserError(f"--hardware: the peak FLOP/s of a {chip.name} is not in the table; run --measure on "
                            "that machine instead")
        tokens_per_s = chips * peak * mfu / work.flops_per_token
    hours = work.tokens / tokens_per_s / 3600
    chip_hours = hours * chips
    energy_kwh = chip_hours * (acct.chip_watts or chip.watts) / 1000
    g_per_kwh, carbon_source = carbon_intensity(acct.region, acct.carbon_intensity, acct.carbon_source)
    price = acct.usd_per_chip_hour or chip.usd_per_hour
    budget = work.flops_per_token * work.tokens
    optimal_params = math.sqrt(budget / (6 * TOKENS_PER_PARAM))
    return {
        "hardware": f"{chip.name} x {chips}", "params": work.params, "flops_per_token": work.flops_per_token,
        "tokens": work.tokens, "tokens_source": work.tokens_source,
        "mfu": mfu, "tokens_per_s": tokens_per_s, "hours": hours, "chip_hours": chip_hours,
        "energy_kwh": energy_kwh, "watts_per_chip": acct.chip_watts or chip.watts,
        "co2e_kg": energy_kwh * acct.pue * g_per_kwh / 1000, "pue": acct.pue, "carbon_g_per_kwh": g_per_kwh,
        "carbon_source": carbon_source, "cost_usd": chip_hours * price if price else None,
        "usd_per_chip_hour": price or None, "compute_optimal_tokens": TOKENS_PER_PARAM * work.params,
        "budget_flops": budget, "budget_optimal_params": optimal_params,
        "budget_optimal_tokens": TOKENS_PER_PARAM * optimal_params,
    }


def workload(cfg: Config | None, params: float | None, tokens: float | None) -> Workload:
    """The model's size and FLOPs (from the experiment, or 6N for --params N) and the tokens to train."""
    if cfg is None:
        if not params or params <= 0:
            raise UserError("give an experiment file, or --params N (the model's parameter count)")
        n = int(params)
        flops = 6.0 * n  # no sequence length to count attention with: the 6N rule
        given = tokens if tokens else TOKENS_PER_PARAM * n
        return Workload(n, flops, float(given), "--tokens" if tokens else "compute-optimal (20 x params)")
    if params:
        raise UserError("--params: the experiment file gives the model; drop one of them")
    from train.accounting import train_flops_per_token

    model = resolved_model(cfg)
    n = count_model_params(model)
    tc = cfg.train
    run_tokens = float(tc.steps * tc.batch_size * tc.seq_len)
    return Workload(n, train_flops_per_token(model, tc.seq_len), float(tokens or run_tokens),
                    "--tokens" if tokens else f"the experiment: {tc.steps} steps x {tc.batch_size} x {tc.seq_len}")


def resolved_model(cfg: Config):
    """The experiment's model with its vocabulary size from the tokenizer when the file leaves it 0."""
    from train.setup import resolve_model

    if cfg.model.vocab_size:
        return resolve_model(cfg, cfg.model.vocab_size).model
    if cfg.data.mode == "packed":
        from data.cache import get_tokenizer

        vocab = get_tokenizer(cfg.data)[0].vocab_size
    else:
        from data.pipeline import build_pipeline

        data = build_pipeline(cfg.data, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                              seed=cfg.train.seed)
        vocab = data.tokenizer.vocab_size
        data.close()
    return resolve_model(cfg, vocab).model


def count_model_params(model) -> int:
    """Parameters of the model from its abstract shapes: nothing is allocated, whatever its size."""
    import math as m

    import jax

    from train.state import model_def

    return sum(m.prod(x.shape) for x in jax.tree.leaves(model_def(model).param_shapes()))


def measured_tokens_per_s(cfg: Config, steps: int = 10) -> tuple[float, Chip, int]:
    """Tokens/s of the experiment's train step compiled and timed here, and this machine's chip and count."""
    import os

    import jax

    from train.bench import bench
    from train.hardware import UNKNOWN_CHIP, chip_for_kind

    result = bench(cfg, steps=steps, warmup=2, show=False)
    device = jax.devices()[0]
    chip = chip_for_kind(device.device_kind, device.platform) or UNKNOWN_CHIP
    # as a run counts them (train/energy.py): the cores of a CPU host, the devices of an accelerator
    chips = len(os.sched_getaffinity(0)) * jax.process_count() if device.platform == "cpu" else jax.device_count()
    return result["tokens_per_s"], chip, chips


def run_plan(cfg: Config | None, acct: AccountingConfig, *, hardware: str | None, tokens: float | None, params: float | None,
             mfu: float, measure: bool, json_path: str | None) -> dict:
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu: a fraction of the peak in (0, 1], got {mfu}")
    if tokens is not None and tokens <= 0:
        raise UserError(f"--tokens: must be positive, got {tokens:g}")
    work = workload(cfg, params, tokens)
    if measure:
        if hardware:
            raise UserError("--measure times the step on this machine, so it is the hardware: drop --hardware "
                            "(or drop --measure to plan for another machine from its peak and --mfu)")
        if cfg is None:
            raise UserError("--measure compiles the experiment's step: give the experiment file")
        tokens_per_s, chip, chips = measured_tokens_per_s(cfg)
        figures = plan(work, chip, chips, acct, tokens_per_s=tokens_per_s)
        figures["mfu"] = None
        figures["measured"] = "measured: the experiment's compiled step on this machine"
    else:
        if not hardware:
            raise UserError("--hardware: give the machine to plan for, e.g. v5p-256, v5e-64, h100-8 (or --measure "
                            "to time this one)")
        chip, chips = parse_hardware(hardware)
        dtype = "float32" if cfg is not None and cfg.model.dtype == "float32" else "bfloat16"
        figures = plan(work, chip, chips, acct, mfu=mfu, dtype=dtype)
    print(format_plan(figures))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
    return figures


def duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.3g} min"
    return f"{hours:,.4g} h" + (f" ({hours / 24:,.3g} days)" if hours >= 48 else "")


def format_plan(f: dict) -> str:
    cost = f"${f['cost_usd']:,.4g} at ${f['usd_per_chip_hour']:.2f}/chip-hour" if f["cost_usd"] is not None else \
        "unknown (set accounting.usd_per_chip_hour)"
    speed = f["measured"] if f.get("measured") else f"at MFU {f['mfu']:.0%}"
    lines = [
        ("hardware", f["hardware"]),
        ("model", f"{f['params'] / 1e6:,.2f}M params, {f['flops_per_token']:.4g} FLOPs per token"),
        ("tokens", f"{f['tokens']:.4g} ({f['tokens_source']})"),
        ("speed", f"{f['tokens_per_s']:,.0f} tokens/s, {speed}"),
        ("time", duration(f["hours"])),
        ("chip-hours", f"{f['chip_hours']:,.4g}"),
        ("energy", f"{f['energy_kwh']:,.4g} kWh ({f['watts_per_chip']:g} W per chip, busy throughout)"),
        ("CO2e", f"{f['co2e_kg']:,.4g} kg (PUE {f['pue']:g}, {f['carbon_g_per_kwh']:g} g/kWh: {f['carbon_source']})"),
        ("cost", cost),
        ("compute-optimal", f"{f['compute_optimal_tokens']:.4g} tokens for this model (20 per parameter); this "
                            f"budget ({f['budget_flops']:.3g} FLOPs) is optimal for a "
                            f"{f['budget_optimal_params'] / 1e6:,.1f}M model on {f['budget_optimal_tokens']:.3g} "
                            "tokens"),
    ]
    return "\n".join(f"{k:>16}  {v}" for k, v in lines)

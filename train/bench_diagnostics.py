"""`meshforge bench EXPERIMENT --compare diagnostics`: the step time with training diagnostics off and on.

Three compiled steps run in one process on their own freshly initialised state, alternating a few steps at a
time, so that a machine that drifts faster or slower during the measurement moves all of them: diagnostics off
(log.diagnostics_every 0); on, every k steps (the experiment's k, or train.log_every), whose median step is one
that only computes the activation RMS; and on, every step, where each step is a diagnostics step (all norms). A run
with period k pays the first on k - 1 steps of k and the last on one: the `amortised` figure.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

import jax

from train.bench import StepTimer, check_steps
from train.config import Config
from train.hardware import cpu_model

CHUNK = 5  # steps each timer runs before the next takes its turn


def with_diagnostics(cfg: Config, every: int) -> Config:
    log_every = min(cfg.train.log_every, every) if every else cfg.train.log_every  # keep them compatible
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, diagnostics_every=every),
                               train=dataclasses.replace(cfg.train, log_every=log_every))


def compare_diagnostics(cfg: Config, *, steps: int = 40, warmup: int = 3, json_path: str | None = None,
                        show: bool = True) -> dict:
    check_steps(steps, warmup)
    every = cfg.log.diagnostics_every or cfg.train.log_every
    timers = {name: StepTimer(with_diagnostics(cfg, k)) for name, k in (("off", 0), ("on", every), ("every", 1))}
    for timer in timers.values():
        timer.run(warmup, timed=False)
    order, done, ratios = list(timers.items()), 0, []
    while done < steps:
        n = min(CHUNK, steps - done)
        for _, timer in order:
            timer.run(n)
        # A round's sides ran within a second or two of each other: their ratio cancels the load of other
        # processes that changes more slowly, which the medians of the whole measurement do not.
        ratios.append({name: statistics.median(t.times[-n:]) for name, t in timers.items()})
        order = order[1:] + order[:1]  # each goes first in turn: no side always follows the same one
        done += n
    ms = {name: 1000 * statistics.median(timer.times) for name, timer in timers.items()}
    ratio = {name: statistics.median(r[name] / r["off"] for r in ratios) for name in ("on", "every")}
    result = {
        "experiment": cfg.name, "device": device_name(), "devices": jax.device_count(), "cores": os.cpu_count(),
        "steps_timed": steps, "diagnostics_every": every, "step_ms_off": round(ms["off"], 3),
        "step_ms_on": round(ms["on"], 3), "step_ms_diagnostics_step": round(ms["every"], 3),
        # medians over the rounds of each round's ratio
        "on_over_off": round(ratio["on"], 4), "diagnostics_step_over_off": round(ratio["every"], 4),
        "amortised_over_off": round(ratio["on"] + (ratio["every"] - ratio["on"]) / every, 4),
        "compile_s": {name: round(timer.compile_s, 2) for name, timer in timers.items()},
    }
    if show:
        print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def device_name() -> str:
    """The accelerator's kind, or on a CPU its model name (as lscpu gives it)."""
    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else cpu_model()


def format_table(r: dict) -> str:
    k, c = r["diagnostics_every"], r["compile_s"]
    rows = {
        "machine": f"{r['device']} | {r['devices']} devices | {r['cores']} cores",
        "off": f"{r['step_ms_off']:8.2f} ms/step  (median of {r['steps_timed']} steps; compile {c['off']:.1f} s)",
        f"on, every {k}": f"{r['step_ms_on']:8.2f} ms/step  (a step between: activation RMS only; compile "
                          f"{c['on']:.1f} s)",
        "on, each step": f"{r['step_ms_diagnostics_step']:8.2f} ms/step  (a diagnostics step: all the norms; "
                         f"compile {c['every']:.1f} s)",
        "ratio": f"on / off = {r['on_over_off']:.3f}; a diagnostics step / off = "
                 f"{r['diagnostics_step_over_off']:.3f}; amortised over {k} steps = {r['amortised_over_off']:.3f} "
                 f"(medians of the ratios in rounds of {CHUNK} steps)",
    }
    width = max(map(len, rows)) + 2
    return "\n".join(name.ljust(width) + text for name, text in rows.items())

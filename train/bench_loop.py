"""`meshforge bench EXPERIMENT --compare train`: what the training loop costs beyond its compiled step.

In one process: the step timed alone (train/bench.py), then a real `train` run of the experiment in a temporary
workdir (its evaluations, checkpoints and logging included), then the step alone again. The loop's median step
time is set against the mean of the two bench medians, which bracket the run, so a machine that drifts faster or
slower during the run moves both sides; the run's set-up and evaluation time are set against its wall time.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from train.hardware import cpu_model, load_average, vector_extensions
from train.bench import bench, check_steps
from train.config import Config


def compare_train(cfg: Config, *, steps: int, warmup: int, json_path: str | None) -> dict:
    from train.loop import train

    check_steps(steps, warmup)  # before anything is compiled
    before = bench(cfg, steps=steps, warmup=warmup, show=False)
    with tempfile.TemporaryDirectory(prefix="meshforge-bench-") as tmp:
        run = train(cfg, Path(tmp) / "run", started=time.perf_counter())
    after = bench(cfg, steps=steps, warmup=warmup, show=False)
    bench_ms = (before["step_ms_median"] + after["step_ms_median"]) / 2
    result = {
        "cpu": cpu_model(), "vector_extensions": vector_extensions(), "cores": os.cpu_count(),
        "load_average_after": load_average(), "experiment": cfg.name, "devices": before["devices"],
        "bench_steps_timed": steps, "bench_step_ms_before": before["step_ms_median"],
        "bench_step_ms_after": after["step_ms_median"], "bench_step_ms": round(bench_ms, 3),
        "train_steps": run["steps_this_run"], "train_step_ms": run["step_ms_median"],
        "train_over_bench": round(run["step_ms_median"] / bench_ms, 3),
        "train_wall_s": run["wall_s"], "train_setup_s": run["startup_s"], "train_compile_s": run["compile_s"],
        "train_eval_s": run["eval_s"], "train_evals": run["evals"], "final_val_loss": run["final_val_loss"],
    }
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_table(r: dict) -> str:
    wall = r["train_wall_s"]
    return "\n".join([
        f"machine   {r['cpu']} | {r['cores']} cores | {' '.join(r['vector_extensions']) or 'no x86/ARM vector flags'}",
        f"bench     {r['bench_step_ms']:8.2f} ms/step  (median of {r['bench_steps_timed']} steps: "
        f"{r['bench_step_ms_before']:.2f} before the run, {r['bench_step_ms_after']:.2f} after; "
        f"{r['devices']} devices)",
        f"train     {r['train_step_ms']:8.2f} ms/step  (median of {r['train_steps']} steps)",
        f"ratio     train / bench = {r['train_over_bench']:.3f}",
        f"run       {wall:.1f} s: set-up {r['train_setup_s']:.1f} s (compile {r['train_compile_s']:.1f} s), "
        f"{r['train_evals']} evaluations {r['train_eval_s']:.1f} s ({100 * r['train_eval_s'] / wall:.0f}%)",
    ])

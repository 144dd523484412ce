"""`meshforge bench EXPERIMENT --compare torch`: meshforge's train step and a plain PyTorch (eager) version of the
same model, optimizer and batch (interop/torch_reference.py), timed in alternating turns in one process, with the
machine named: a ratio measured side by side is what carries from one machine type to another.

PyTorch runs with its default thread count (one per core) and its fused CPU AdamW; meshforge runs as `bench` does
(one virtual device per core on a CPU host). Both take the experiment's first training batch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from data.loader import process_rows
from interop.bench_generate import cpu_model, load_average
from models.transformer import ModelConfig, compute_dtype
from optim.chains import OptimConfig
from parallel.errors import UserError
from train.bench import StepTimer, bench, check_steps
from train.config import Config
from train.hardware import vector_extensions  # noqa: F401  (bench_edge uses it from here)

def check_supported(m: ModelConfig, o: OptimConfig) -> None:
    """One line naming the field the reference does not implement."""
    unsupported = [
        ("model.moe_experts", m.moe_experts, 0), ("model.lora_rank", m.lora_rank, 0),
        ("model.scan_layers", m.scan_layers, False), ("model.remat", m.remat, "none"),
        ("model.dtype", str(np.dtype(compute_dtype(m.dtype))), "float32"),
        ("model.param_dtype", m.param_dtype, "float32"),
        ("model.qk_norm", m.qk_norm, False), ("model.rope_scaling", m.rope_scaling, "none"),
        ("model.causal", m.causal, True), ("model.dropout", m.dropout, 0.0),
        ("model.parametrization", m.parametrization, "standard"),
        ("optim.name", o.name, "adamw"), ("optim.accum_steps", o.accum_steps, 1),
    ]
    for key, value, want in unsupported:
        if value != want:
            raise UserError(f"{key}: --compare torch times the dense float32 AdamW model only (got {value!r}); "
                            f"set {key} {want} for the comparison")


class TorchTimer:
    """The PyTorch reference's train step on the given batch, run and timed a few steps at a time."""

    def __init__(self, cfg: Config, tokens_BT: np.ndarray, targets_BT: np.ndarray):
        import torch

        from interop.torch_reference import TorchLM, optimizer

        torch.manual_seed(cfg.train.seed)
        self.model, self.clip = TorchLM(cfg.model), cfg.optim.clip_norm
        self.opt = optimizer(self.model, cfg.optim)
        self.tokens = torch.from_numpy(tokens_BT.astype(np.int64))
        self.targets = torch.from_numpy(targets_BT.astype(np.int64))
        self.times: list[float] = []
        self.losses: list[float] = []

    def run(self, steps: int, *, timed: bool = True) -> None:
        from interop.torch_reference import train_step

        for _ in range(steps):
            t = time.perf_counter()
            loss = train_step(self.model, self.opt, self.clip, self.tokens, self.targets)
            self.losses.append(float(loss.detach()))  # eager: the step is done when its loss is read
            if timed:
                self.times.append(time.perf_counter() - t)

    def report(self) -> dict:
        import torch

        from interop.torch_reference import count_params

        fused = " (fused)" if self.opt.defaults.get("fused") else ""
        return {"step_ms_median": round(1000 * statistics.median(self.times), 3), "params": count_params(self.model),
                "threads": torch.get_num_threads(), "version": torch.__version__, "first_loss": self.losses[0],
                "optimizer": type(self.opt).__name__ + fused}


ROUNDS = 5  # the timed steps are split into this many turns per side: a machine that drifts moves both


def compare(cfg: Config, *, steps: int, warmup: int, json_path: str | None) -> dict:
    from train.setup import build

    check_supported(cfg.model, cfg.optim)
    check_steps(steps, warmup)  # before anything is compiled
    if importlib.util.find_spec("torch") is None:
        raise UserError("--compare torch needs PyTorch: pip install -e '.[bench]'")
    setup = build(cfg)  # the resolved config (vocabulary from the tokenizer) and the first batch
    try:
        host = setup.data.host_batch(0, process_rows(setup.batch_sharding, setup.cfg.train.batch_size))
    finally:
        setup.data.close()
    if set(host) - {"inputs", "targets", "weights"} or float(np.min(host.get("weights", 1.0))) < 1.0:
        raise UserError("data.objective: --compare torch times plain next-token windows only (data.mode windows, "
                        "objective causal)")
    mf, pt = StepTimer(setup.cfg), TorchTimer(setup.cfg, host["inputs"], host["targets"])
    for timer in (mf, pt):
        timer.run(warmup, timed=False)
    for turn in range(ROUNDS):  # alternate, a share of the steps each
        share = steps * (turn + 1) // ROUNDS - steps * turn // ROUNDS
        for timer in (mf, pt):
            timer.run(share)
    ours, theirs = bench(setup.cfg, steps=steps, warmup=warmup, show=False, timer=mf), pt.report()
    result = {
        "cpu": cpu_model(), "vector_extensions": vector_extensions(), "cores": os.cpu_count(),
        "load_average_after": load_average(), "experiment": setup.cfg.name,
        "batch": f"{setup.cfg.train.batch_size} x {setup.cfg.train.seq_len}", "steps_timed": steps,
        "meshforge_step_ms": ours["step_ms_median"], "meshforge_devices": ours["devices"],
        "meshforge_params": ours["params"], "meshforge_compile_s": ours["compile_s"],
        "torch_step_ms": theirs["step_ms_median"], "torch_params": theirs["params"], "torch_threads": theirs["threads"],
        "torch_version": theirs["version"], "torch_optimizer": theirs["optimizer"],
        "torch_first_loss": round(theirs["first_loss"], 4),
        "torch_over_meshforge": round(theirs["step_ms_median"] / ours["step_ms_median"], 3),
    }
    if result["meshforge_params"] != result["torch_params"]:  # not the same model: the ratio would mean nothing
        raise RuntimeError(f"the PyTorch reference has {result['torch_params']} parameters, meshforge "
                           f"{result['meshforge_params']}: interop/torch_reference.py is out of step with the model")
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_table(r: dict) -> str:
    return "\n".join([
        f"machine   {r['cpu']} | {r['cores']} cores | {' '.join(r['vector_extensions']) or 'no x86/ARM vector flags'}",
        f"model     {r['experiment']}: {r['meshforge_params'] / 1e6:.2f}M params, batch {r['batch']}, "
        f"{r['steps_timed']} timed steps each",
        f"meshforge {r['meshforge_step_ms']:8.2f} ms/step  ({r['meshforge_devices']} XLA devices, "
        f"compile {r['meshforge_compile_s']:.1f} s)",
        f"PyTorch   {r['torch_step_ms']:8.2f} ms/step  (torch {r['torch_version']} eager, {r['torch_threads']} "
        f"threads, {r['torch_optimizer']})",
        f"ratio     PyTorch / meshforge = {r['torch_over_meshforge']:.2f}  (above 1: meshforge is faster)",
    ])

"""`meshforge bench`: compile the experiment's train step, time it, and show how close it runs to the hardware.

The step is the one `meshforge train` runs (same builder, shardings, data and AOT compile), each timed from
dispatch to completion with the next batch built while it runs, so the median matches the step_ms_median of
train's summary (`meshforge bench --compare train` measures both in one process).
Nothing is written to a workdir: the state is freshly initialised and thrown away.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from models.attention import pick_implementation
from models.transformer import compute_dtype
from parallel.analysis import collectives, memory_per_device
from parallel.errors import UserError
from parallel.rules import activate
from train.accounting import device_peak, matmul_params_per_token, mfu, train_flops_per_token
from train.config import Config
from train.setup import build, compile_timed
from train.state import count_params, init_state


class StepTimer:
    """The experiment's compiled train step on freshly initialised state, run and timed a few steps at a time, so
    that a side-by-side comparison can alternate it with another timer (interop/bench_torch.py)."""

    def __init__(self, cfg: Config):
        self.setup = build(cfg)
        self.cfg, tc = self.setup.cfg, self.setup.cfg.train
        with activate(self.setup.mesh):
            self.state = init_state(self.setup.tx, self.setup.mdef, self.setup.shardings, tc.seed)
            self.batch = self.setup.batch_fn()
            self.next_batch = self.batch(0)
            self.flags = self.setup.flags.array()
            self.compiled, self.compile_s = compile_timed(self.setup.train_step(), self.state, self.next_batch,
                                                          self.flags)
        self.done = 0
        self.times: list[float] = []
        self.tokens: list[float] = []

    def run(self, steps: int, *, timed: bool = True) -> None:
        with activate(self.setup.mesh):
            for _ in range(steps):
                t = time.perf_counter()
                self.state, metrics = self.compiled(self.state, self.next_batch, self.flags)
                self.done += 1
                self.next_batch = self.batch(self.done)  # built while the step runs, as in train
                jax.block_until_ready((self.state, metrics))
                if timed:
                    self.times.append(time.perf_counter() - t)
                    self.tokens.append(float(metrics["tokens"]))


def check_steps(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")


def bench(cfg: Config, *, steps: int = 20, warmup: int = 3, json_path: str | None = None,
          show: bool = True, timer: StepTimer | None = None) -> dict:
    """Compile and time the step; with `timer`, report the steps that timer has already run."""
    check_steps(steps, warmup)
    if timer is None:
        timer = StepTimer(cfg)
        timer.run(warmup, timed=False)
        timer.run(steps)
    setup, cfg, tc = timer.setup, timer.cfg, timer.cfg.train
    compiled, compile_s, times, tokens, state = timer.compiled, timer.compile_s, timer.times, timer.tokens, timer.state
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    n_dev = jax.device_count()
    step_s = statistics.median(times)
    tokens_per_step = float(np.mean(tokens))
    tokens_per_s = tokens_per_step / step_s
    model_flops = train_flops_per_token(cfg.model, tc.seq_len)
    xla_flops = float(cost.get("flops", 0.0)) * n_dev / tokens_per_step if cost else None
    peak, peak_source = device_peak(cfg.model.dtype)
    p10, p90 = np.percentile(times, [10, 90]) if len(times) > 1 else (step_s, step_s)
    result = {
        "name": cfg.name,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "devices": n_dev,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "params": count_params(state["params"]),
        "active_matmul_params": matmul_params_per_token(cfg.model),
        "dtype": cfg.model.dtype,
        "param_dtype": cfg.model.param_dtype,
        "remat": cfg.model.remat,
        "attention": pick_implementation(cfg.model.attention_impl, compute_dtype(cfg.model.dtype),
                                         cfg.model.head_size),
        "scan_layers": cfg.model.scan_layers,
        "batch_size": tc.batch_size,
        "seq_len": tc.seq_len,
        "compile_s": round(compile_s, 3),
        "steps_timed": len(times),
        "step_ms_median": round(1000 * step_s, 3),
        "step_ms_p10": round(1000 * float(p10), 3),
        "step_ms_p90": round(1000 * float(p90), 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_token": model_flops,
        "xla_flops_per_token": xla_flops,
        # XLA's cost analysis counts a while-loop body once: scanned layers and accumulation make it low.
        "xla_flops_loops_counted_once": cfg.model.scan_layers or cfg.optim.accum_steps > 1,
        # On GPU the matmuls and attention run as cuBLAS/cuDNN custom calls, which the cost analysis skips.
        "xla_flops_library_calls_missing": jax.devices()[0].platform == "gpu",
        "achieved_tflops_per_device": tokens_per_s * model_flops / n_dev / 1e12,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "peak_source": peak_source,
        "mfu": mfu(tokens_per_s, model_flops, peak, n_dev),
        "memory_per_device": memory_per_device(compiled),
        "collectives": collectives(compiled.as_text()),
        **({"communication": communication(setup.rounds, tokens_per_step)} if setup.rounds is not None else {}),
    }
    if show:
        print_table(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def communication(plan, tokens_per_step: float) -> dict:
    """Bytes a run with replicas sends, beside synchronous data parallelism on the same tokens (the payload each
    replica contributes: its outer gradient once a round, or its gradient every step)."""
    cfg = plan.cfg
    per_round = sum(plan.fragment_bytes)
    per_token = cfg.replicas * per_round / (cfg.inner_steps * tokens_per_step)
    sync_per_token = cfg.replicas * plan.sync_bytes_per_step / tokens_per_step
    return {"replicas": cfg.replicas, "inner_steps": cfg.inner_steps, "fragments": cfg.fragments, "send": cfg.send,
            "bytes_per_replica_per_round": per_round, "bytes_per_token": per_token,
            "sync_bytes_per_token": sync_per_token, "reduction": sync_per_token / per_token}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"meshforge bench: {r['name']}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    t.add_row("devices", f"{r['devices']} x {r['device_kind']} ({r['platform']}), mesh {mesh}")
    t.add_row("model", f"{r['params'] / 1e6:.2f}M params ({r['active_matmul_params'] / 1e6:.2f}M active matmul), "
                       f"compute {r['dtype']}, params {r['param_dtype']}, attention {r['attention']}, "
                       f"remat {r['remat']}, scan {r['scan_layers']}")
    t.add_row("batch", f"{r['batch_size']} x {r['seq_len']} tokens")
    t.add_row("compile", f"{r['compile_s']:.2f} s")
    t.add_row("step time", f"median {r['step_ms_median']:.2f} ms  (p10 {r['step_ms_p10']:.2f}, "
                           f"p90 {r['step_ms_p90']:.2f}; {r['steps_timed']} steps)")
    t.add_row("throughput", f"{r['tokens_per_s']:,.0f} tokens/s")
    xla = r["xla_flops_per_token"]
    note = " (loop bodies counted once)" if r["xla_flops_loops_counted_once"] else ""
    note += " (cuBLAS/cuDNN calls not counted)" if r.get("xla_flops_library_calls_missing") else ""
    t.add_row("FLOPs/token", f"model {r['model_flops_per_token'] / 1e6:.2f} M | XLA "
                             f"{xla / 1e6:.2f} M{note}" if xla else f"model {r['model_flops_per_token'] / 1e6:.2f} M")
    peak = r["peak_tflops_per_device"]
    t.add_row("FLOP/s per device", f"{r['achieved_tflops_per_device'] * 1e3:.2f} GFLOP/s achieved"
              + (f" of {peak * 1e3:,.1f} GFLOP/s peak [{r['peak_source']}]" if peak else f" [{r['peak_source']}]"))
    t.add_row("MFU", f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a")
    m = r["memory_per_device"]
    if m:
        t.add_row("memory per device", f"peak {_bytes(m['peak'])} = arguments {_bytes(m['arguments'])} + outputs "
                                       f"{_bytes(m['outputs'])} - aliased {_bytes(m['aliased'])} + temporaries "
                                       f"{_bytes(m['temporaries'])}")
    if c := r.get("communication"):
        t.add_row("replicas", f"{c['replicas']} replicas, a sync every {c['inner_steps']} steps ({c['fragments']} "
                              f"fragment(s), outer gradients in {c['send']}): {_bytes(c['bytes_per_replica_per_round'])} "
                              f"per replica per round, {c['bytes_per_token']:,.0f} B/token; synchronous data "
                              f"parallel: {c['sync_bytes_per_token']:,.0f} B/token ({c['reduction']:.0f}x more)")
    for kind, c in r["collectives"].items():
        if c["count"]:
            t.add_row(kind, f"{c['count']} ops, {_bytes(c['bytes'])} per step")
    if not any(c["count"] for c in r["collectives"].values()):
        t.add_row("collectives", "none")
    Console().print(t)

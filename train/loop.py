"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint, summarise.

Reliability lives here too: resume from the newest readable checkpoint, SIGTERM -> checkpoint -> exit 0,
non-finite steps skipped (inside the jitted step) and counted, a lock so two runs never share a workdir, and
storage failures reported in one line without touching the last valid checkpoint.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data.loader import process_rows, to_global
from data.tokenize import save_tokenizer
from optim import trainable
from optim.chains import nonfinite_counts
from optim.outer import STATS
from parallel.hosts import agree, barrier
from parallel.mesh import padded_rows
from parallel.rules import activate
from train.accounting import device_peak, mfu, train_flops_per_token
from train.checkpoint import Checkpointer, has_checkpoints, latest_committed_step
from parallel.errors import UserError
from train.config import Config
from train.diagnostics import diagnostics_for
from train.energy import TOTALS, EnergyMeter
from train.faults import Faults
from train.fit import check_state_fits, check_step_fits
from train.health import Health, RunStopped, TrainingHalted
from train.metrics import MetricsWriter, Progress, json_value
from train.preemption import PreemptionGuard
from train.setup import Setup, build, check_resumable, compile_timed
from train.state import abstract_state, count_params, init_state
from train.step import make_eval_step
from train.task_eval import task_evaluator
from train.workdir import RunLock, archive_run, ensure_writable, is_storage_failure, storage_error


def val_source_names(setup: Setup) -> list[str]:
    """The names of val_loss_<name>: the validation sources, when there are several (with one, val_loss is its
    loss already, and the eval step stays the plain one)."""
    names = list(setup.data.val_names)
    return names if len(names) > 1 else []


def eval_step_for(setup: Setup):
    """The jitted eval step `evaluate` needs for this run's validation sources."""
    return make_eval_step(setup.mdef, setup.shardings["params"], setup.batch_sharding, len(val_source_names(setup)))


def evaluate(setup: Setup, params, eval_step, max_batches: int = 0) -> dict[str, float]:
    """{'val_loss': the token-weighted mean loss over the validation windows, and with several validation
    sources 'val_loss_<name>' for each}, from one pass (over all planned windows unless max_batches > 0).
    eval_step: eval_step_for(setup). A source no evaluated window reaches (max_batches) reports NaN."""
    cfg = setup.cfg.train
    bs = setup.batch_sharding
    batch_size = padded_rows(setup.mesh, cfg.eval_batch_size)  # padded rows have zero weight
    rows = process_rows(bs, batch_size)
    names = val_source_names(setup)
    by_row = NamedSharding(setup.mesh, PartitionSpec(bs.spec[0]))
    sums = []
    for host_batch in setup.data.eval_batches(batch_size, rows, max_batches):
        source = host_batch.pop("source", None)
        source = (jax.make_array_from_process_local_data(by_row, source, (batch_size,)),) if names else ()
        sums.append(eval_step(params, to_global(host_batch, bs, batch_size), *source))
        throttle(sums)
    if not sums:  # an empty validation split (e.g. data.synthetic_val_rows 0): nothing to report
        return {"val_loss": float("nan"), **{f"val_loss_{n}": float("nan") for n in names}}
    totals = [sum(x) for x in zip(*jax.device_get(sums))]  # loss, weight (, per-source loss, weight)
    out = {"val_loss": float(totals[0]) / max(float(totals[1]), 1.0)}
    for name, loss, weight in zip(names, *totals[2:]):
        out[f"val_loss_{name}"] = float(loss) / float(weight) if weight > 0 else float("nan")
    return out


def window_metrics(fetched: list[dict]) -> dict[str, float]:
    """The step's other metrics (MoE statistics, ...) averaged over the logging window; vectors become one
    flat key per entry (moe_expert_frac_0, moe_expert_frac_1, ...). Sparsity and the figures of the last outer
    synchronisation are states, not rates: the window's last value."""
    out = {}
    for key in fetched[0]:
        if key in ("loss", "grad_norm", "lr", "tokens", "skipped_steps", "nonfinite_in_a_row", "flags", "diag"):
            continue  # logged above, counted by Health, or read by the loop
        if key.startswith("sparsity") or key in STATS:
            out[key] = float(fetched[-1][key])
            continue
        mean = np.mean([np.asarray(x[key], np.float64) for x in fetched], axis=0)
        if mean.ndim == 0:
            out[key] = float(mean)
        else:
            out.update({f"{key}_{i}": float(v) for i, v in enumerate(mean.ravel())})
    return out


# How many dispatched steps may run ahead of the host. XLA's CPU runtime deadlocks in a collective when dozens of
# multi-device programs are queued (seen here with 2 virtual devices: ~50 queued calls hang, 16 never did), and
# nothing is gained beyond a few: the next batch only needs to be ready when the device is.
MAX_IN_FLIGHT = 4


def throttle(outputs: list) -> None:
    """Wait for the call MAX_IN_FLIGHT places back, so at most that many are queued on the devices."""
    if len(outputs) > MAX_IN_FLIGHT:
        jax.block_until_ready(outputs[-MAX_IN_FLIGHT - 1])


class StepOutputs:
    """Metrics of dispatched steps. Fetching the oldest once more than MAX_IN_FLIGHT are queued is the throttle,
    and it hands the loop every step's agreed flags and health counters a few steps late, at no extra wait."""

    def __init__(self):
        self.pending: collections.deque = collections.deque()
        self.window: list[dict] = []  # fetched since the last log row

    def push(self, step: int, metrics: dict) -> list[tuple[int, dict]]:
        """Queue a step's metrics; return (step, host metrics) of those fetched now."""
        self.pending.append((step, metrics))
        return self._fetch(MAX_IN_FLIGHT)

    def drain(self) -> list[tuple[int, dict]]:
        """Fetch every step still in flight."""
        return self._fetch(0)

    def _fetch(self, leave: int) -> list[tuple[int, dict]]:
        ready = []
        while len(self.pending) > leave:
            step, metrics = self.pending.popleft()
            ready.append((step, jax.device_get(metrics)))
        self.window += [m for _, m in ready]
        return ready

    def take_window(self) -> list[dict]:
        window, self.window = self.window, []
        return window


def say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


class Compiled(NamedTuple):
    step: Any  # the compiled train step
    seconds: float  # its compile time
    started: float  # perf_counter() when the command started: wall and start-up times count from there
    on_eval: Callable[[int, float], None] | None = None  # train()'s hook, called after each evaluation
    resumed: dict | None = None  # the extras of the checkpoint a resumed run starts from
    meter: EnergyMeter | None = None  # energy, carbon and cost since the command started


def train(cfg: Config, workdir: Path, fresh: bool = False, initial: Callable | None = None,
          started: float | None = None, on_eval: Callable[[int, float], None] | None = None) -> dict:
    """Train (or resume) the run of `cfg` in `workdir`. `initial(mdef, param_shardings)` gives pretrained
    parameters for a new run (train.init_from; interop.pretrained). `started`: perf_counter() at the command's
    start (the CLI's process start), for the summary's wall_s and startup_s; by default, this call.
    `on_eval(step, val_loss)` is called on every process after each evaluation; it may raise RunStopped (or a
    subclass) to end the run there."""
    started = time.perf_counter() if started is None else started
    workdir = Path(workdir)
    if cfg.log.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("log.wandb_project: W&B is not installed; pip install wandb (or the lab extra), or leave "
                        "log.wandb_project empty")
    meter = EnergyMeter(cfg.accounting, started)  # its counters count start-up and compilation too
    resuming = has_checkpoints(workdir / "checkpoints") and not fresh
    setup = build(cfg, workdir if resuming else None)  # validates everything before any file is written
    if resuming:
        check_resumable(setup.cfg, workdir)
    with activate(setup.mesh):
        # Memory is checked on shapes alone: before any buffer is allocated or any file written.
        target = abstract_state(setup.tx, setup.mdef, setup.shardings)
        agree(lambda: check_state_fits(target), "the train state does not fit in memory on another host")
        flags = jax.ShapeDtypeStruct(setup.flags.shape, np.int32, sharding=setup.flags.sharding)
        step, seconds = compile_timed(setup.train_step(), target, setup.abstract_batch(), flags)
        agree(lambda: check_step_fits(step), "the train step does not fit in memory on another host")
    is_main = jax.process_index() == 0
    agree(lambda: ensure_writable(workdir), "the workdir is not writable on another host")
    lock = RunLock(workdir) if is_main else None
    agree(lock.acquire if lock else None, "process 0 could not lock the workdir")
    try:
        if fresh and is_main and (moved := archive_run(workdir)):
            say(f"meshforge: --fresh: moved the earlier run in {workdir} to {moved}")
        if fresh:
            barrier("fresh")  # no process lists the workdir before the archive move is done
        start = target if resuming else (lambda sh: initial(setup.mdef, sh)) if initial else None
        return _train(setup, workdir, start, Compiled(step, seconds, started, on_eval, meter=meter))
    except Exception as e:
        if is_storage_failure(e):
            raise storage_error(workdir, e, latest_committed_step(workdir / "checkpoints")) from None
        raise
    finally:
        setup.data.close()  # stop the prefetch thread
        meter.close()
        if lock:
            lock.release()


def _train(setup: Setup, workdir: Path, start, compiled: Compiled) -> dict:
    """start: the abstract state to restore into when resuming; for a new run None (random initialisation) or
    a function of the param shardings giving pretrained parameters."""
    cfg, tc = setup.cfg, setup.cfg.train
    with activate(setup.mesh), PreemptionGuard(tc.preempt_grace_s) as preemption:
        ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints, keep_every=tc.keep_every)
        if start is not None and not callable(start):
            state, _extra, _ = ckpt.restore_latest_valid(start, warn=lambda m: say(f"meshforge: warning: {m}"))
            setup.data.restore(_extra.get("data") or {})  # the loader continues from the saved position
            compiled = compiled._replace(resumed=_extra)
        else:
            state = init_state(setup.tx, setup.mdef, setup.shardings, tc.seed, initial=start)
        # Every leaf ready before the first step: a restore's programs still running beside the train step can
        # deadlock XLA's CPU collectives (seen once in a resumed run with replicas: two programs' all-reduces).
        state = jax.block_until_ready(state)
        start = int(jax.device_get(state["step"]))
        if start >= tc.steps:
            ckpt.close()
            say(f"meshforge: {workdir} already finished {start} steps (train.steps={tc.steps}); "
                "raise --train.steps to continue")
            summary_path = workdir / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": start}
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(cfg.to_json())
            save_tokenizer(setup.data.tokenizer, workdir / "tokenizer.json")
        wandb = {"project": cfg.log.wandb_project, "mode": cfg.log.wandb_mode, "name": cfg.name,
                 "config": cfg.to_dict()} if cfg.log.wandb_project else None
        metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=cfg.log.tensorboard,
                                wandb=wandb)
        try:
            return _loop(setup, workdir, state, start, ckpt, metrics, preemption, compiled)
        except (TrainingHalted, RunStopped):
            # Every process halts at the same step: finish the saves in flight together, so that no process is
            # left waiting in a multi-host save's barrier for a peer that already exited.
            ckpt.wait()
            ckpt.close()
            raise
        finally:
            metrics.close()


def _loop(setup: Setup, workdir: Path, state, start: int, ckpt: Checkpointer, metrics: MetricsWriter,
          preemption: PreemptionGuard, compiled: Compiled) -> dict:
    cfg, tc = setup.cfg, setup.cfg.train
    if start:  # the totals go on from the killed session's last log row (work redone since counts twice)
        compiled.meter.prior = metrics.last_values(TOTALS) or (compiled.resumed or {}).get("accounting") or {}
    metrics.truncate_after(start)  # rows past the restored step (or any rows, for a new run) belong to no checkpoint
    progress = metrics.show_progress(tc.steps, start, cfg.log.progress, enabled=jax.process_index() == 0)
    n_params, mask = count_params(state["params"]), setup.mdef.trainable
    trained = "" if mask is None else f" ({trainable.count(state['params'], mask) / n_params:.1%} trained)"
    progress.log(f"meshforge: {cfg.name} | {n_params / 1e6:.2f}M params{trained} | mesh "
                 f"{dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices | "
                 f"{'resuming at step ' + str(start) if start else 'new run'} | workdir {workdir}")
    progress.log("config: " + json.dumps(cfg.to_dict(), separators=(",", ":")))
    progress.log(f"compiled the train step in {compiled.seconds:.1f}s")

    rate = Throughput(cfg.model, tc.seq_len, compiled.started, compiled.meter)
    evaluations = Evaluations(setup, metrics, progress, rate, compiled.on_eval)
    faults = Faults()
    batch = setup.batch_fn(edit=faults.corrupt_batch)
    next_batch = batch(start)
    outputs = StepOutputs()
    health = Health(tc, int(jax.device_get(nonfinite_counts(state["opt_state"])[1])), progress.log,
                    ckpt.latest_step)
    diagnostics = diagnostics_for(setup, progress.log)  # log.diagnostics_every: per-layer norms, warnings
    last: dict = {}
    stop = False
    last_save_step, last_save_t = start, time.perf_counter()
    rate.restart()  # the first window starts with the first step
    for step in range(start, tc.steps):
        save_due = tc.checkpoint_every_s > 0 and time.perf_counter() - last_save_t >= tc.checkpoint_every_s
        state, m = compiled.step(state, next_batch, setup.flags.array(stop=preemption.requested, save=save_due))
        rate.dispatched()
        faults.after_dispatch(step + 1, ckpt)
        done = step + 1
        log_now = done % tc.log_every == 0 or done == tc.steps
        if done < tc.steps:
            next_batch = batch(done)  # built while the device runs the step just dispatched
        # Every process reads the same flags from the same steps, so all stop or save at the same step.
        timed_save = False
        for at, fetched in outputs.push(done, m) + (outputs.drain() if log_now else []):
            health.check(at, [fetched])
            flags = setup.flags.read(fetched)
            stop |= flags["stop"]
            timed_save |= flags["save"] and at > last_save_step  # asked for after the last save
        if stop:
            for at, fetched in outputs.drain():  # the steps still in flight belong in the last log row
                health.check(at, [fetched])
        if log_now or stop:
            last = {**rate.row(window := outputs.take_window(), health), **setup.host_metrics(done),
                    **diagnostics.row(done, window)}
            metrics.write(done, last)
            progress.update(done, last)
        evaluated = evaluations.when_due(state["params"], done, stop)
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps or stop or timed_save:
            ckpt.save(done, state, {"data": setup.data.state(done), "config": cfg.to_dict(),
                                    "accounting": rate.energy_totals()})
            last_save_step, last_save_t = done, time.perf_counter()
        if evaluated:
            rate.restart()  # evaluation and its checkpoint are not step time
        if stop:
            ckpt.wait()
            progress.log(f"meshforge: preempted: checkpoint at step {done} written; rerun the same command "
                         "to resume")
            break

    ckpt.wait()
    ckpt.close()
    summary = run_summary(cfg, done, start, stop, n_params, last, evaluations, rate, compiled)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps({k: json_value(v) for k, v in summary.items()}, indent=2))
    progress.close()
    progress.log("done: " + ", ".join(f"{k} {_short(v)}" for k, v in summary.items() if k not in SUMMARY_ONLY
                                      and not k.startswith("final_val_loss_")))
    return summary


# summary.json keys the closing "done:" line leaves out: names and the accounting's constants and sources (and
# the per-source validation losses, final_val_loss_<name>).
SUMMARY_ONLY = ("name", "platform", "chip", "chips_per_host", "energy_method_accelerators", "energy_method_cpu",
                "carbon_source", "price_source", "chip_hours_busy", "energy_kwh_accelerators", "energy_kwh_cpu")


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


# Log-row figures that are totals of the run so far; the summary reports their last value.
RUN_TOTALS = ("comm_bytes", "sync_comm_bytes", "dp_epsilon")


def run_summary(cfg: Config, done: int, start: int, stop: bool, n_params: int, last: dict,
                evaluations: "Evaluations", rate: "Throughput", compiled: Compiled) -> dict:
    return {
        "name": cfg.name, "steps": cfg.train.steps, "last_step": done, "steps_this_run": done - start,
        "preempted": stop, "params": n_params, **rate.summary(done - start), "compile_s": round(compiled.seconds, 2),
        "final_loss": last.get("loss"), "final_val_loss": evaluations.val_loss,
        **({"final_sparsity": last["sparsity"]} if "sparsity" in last else {}),
        **{k: last[k] for k in RUN_TOTALS if k in last},
        **{f"final_{k}": v for k, v in evaluations.figures.items()}, "skipped_steps": last.get("skipped_steps", 0),
        "devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.devices()[0].platform,
    }


class Throughput:
    """Log rows of a window of fetched step metrics, timed from the window's start, and the run's summary figures.

    The summary's step_ms_median is the median time from one dispatch to the next. In steady state the loop runs
    at the devices' pace (on a CPU the call itself waits for the step before; elsewhere the fetch of the metrics
    four steps back does), so that is one step, the figure `meshforge bench` measures. MFU is computed as bench
    computes it (train/accounting.py; on CPU the peak is a ~0.2 s matmul probe). Energy, carbon and cost
    (train/energy.py) count the time between log rows as busy, and the rest of the wall time as idle.
    """

    def __init__(self, model_cfg, seq_len: int, started: float, energy: EnergyMeter):
        self.flops_per_token = train_flops_per_token(model_cfg, seq_len)
        self.peak, _ = device_peak(model_cfg.dtype)
        self.started = started  # perf_counter() when the command started
        self.energy = energy
        self.busy_s = 0.0
        self.step_s: list[float] = []
        self.window_ms: list[float] = []  # each log row's mean: the median's stand-in when no two steps ran in a row
        self.last_dispatch: float | None = None
        self.first_dispatch: float | None = None
        self.tokens = 0.0
        self.eval_s, self.evals = 0.0, 0
        self.t0 = time.perf_counter()

    def dispatched(self) -> None:
        now = time.perf_counter()
        self.first_dispatch = self.first_dispatch or now
        if self.last_dispatch is not None:
            self.step_s.append(now - self.last_dispatch)
        self.last_dispatch = now

    def restart(self) -> None:
        """Start timing anew after work that is not step time (evaluation)."""
        self.t0, self.last_dispatch = time.perf_counter(), None

    def _mfu(self, tokens_per_s: float) -> float:
        return mfu(tokens_per_s, self.flops_per_token, self.peak, jax.device_count())

    def row(self, fetched: list[dict], health: Health) -> dict:
        dt = time.perf_counter() - self.t0
        tokens = sum(t for x in fetched if math.isfinite(t := float(x["tokens"])))
        self.tokens += tokens
        finite = [v for x in fetched if math.isfinite(v := float(x["loss"]))]
        row = {
            "loss": float(np.mean(finite)) if finite else float("nan"),
            "grad_norm": float(fetched[-1]["grad_norm"]),
            "lr": float(fetched[-1]["lr"]),
            "step_ms": 1000 * dt / len(fetched),
            "tokens_per_s": tokens / dt,
            "skipped_steps": health.skipped,
            "loss_spikes": health.spikes,
            **window_metrics(fetched),
        }
        if self.peak:
            row["mfu"] = self._mfu(row["tokens_per_s"])
        self.busy_s += dt
        row.update(self.energy_totals())
        self.window_ms.append(row["step_ms"])
        self.t0 = time.perf_counter()
        return row

    def energy_totals(self) -> dict[str, float]:
        return self.energy.totals(self.busy_s)

    def summary(self, steps: int) -> dict:
        wall = time.perf_counter() - self.started
        median = (statistics.median(self.step_s) if self.step_s
                  else statistics.median(self.window_ms) / 1000 if self.window_ms else None)
        return {
            "tokens_this_run": int(self.tokens),
            "wall_s": round(wall, 2),
            # from the command's start to the first step: imports, data, model, compilation, restore
            "startup_s": round(self.first_dispatch - self.started, 2) if self.first_dispatch else None,
            "eval_s": round(self.eval_s, 2),
            "evals": self.evals,
            "tokens_per_s": round(self.tokens / wall, 1) if wall > 0 else None,
            "step_ms_median": round(1000 * median, 3) if median else None,
            "mfu": round(self._mfu(self.tokens / max(steps, 1) / median), 4) if self.peak and median else None,
            **self.energy_totals(), **self.energy.describe(),  # to the end: the last evaluation and save too
        }


class Evaluations:
    """The validation loss (per source too, with several) and synthetic-task scores at a step: computed, logged,
    and timed for the summary; the last ones stay for it (val_loss, figures)."""

    def __init__(self, setup: Setup, metrics: MetricsWriter, progress: Progress, rate: Throughput,
                 on_eval: Callable[[int, float], None] | None = None):
        self.setup, self.metrics, self.progress, self.rate = setup, metrics, progress, rate
        self.on_eval = on_eval
        self.eval_step = eval_step_for(setup)
        self.task_eval = task_evaluator(setup)  # synthetic tasks: exact match of greedy samples on held-out problems
        self.val_loss: float | None = None
        self.figures: dict[str, float] = {}  # the last val_loss_<name> and task scores

    def when_due(self, params: dict, step: int, stop: bool) -> bool:
        """Evaluate if train.eval_every (or the last step) asks for it at this step and the run is not stopping."""
        tc = self.setup.cfg.train
        due = ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps) and not stop
        if due:
            self(params, step)
        return bool(due)

    def __call__(self, params: dict, step: int) -> tuple[float, dict]:
        t = time.perf_counter()
        losses = evaluate(self.setup, params, self.eval_step, self.setup.cfg.train.eval_batches)
        scores = self.task_eval(params) if self.task_eval is not None else {}
        seconds = time.perf_counter() - t
        self.rate.eval_s, self.rate.evals = self.rate.eval_s + seconds, self.rate.evals + 1
        self.metrics.write(step, {**losses, **scores})
        val_loss = self.val_loss = losses.pop("val_loss")
        self.progress.log(f"eval at step {step}: val_loss {val_loss:.4f}"  # (per-source losses: metrics only)
                          + "".join(f", {k} {v:.4f}" for k, v in scores.items()) + f" ({seconds:.1f}s)")
        self.figures = {**losses, **scores}
        if self.on_eval is not None:
            self.on_eval(step, val_loss)
        return val_loss, self.figures

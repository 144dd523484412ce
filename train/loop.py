"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint, summarise.

Reliability lives here too: resume from the newest readable checkpoint, SIGTERM -> checkpoint -> exit 0,
non-finite steps skipped (inside the jitted step) and counted, a lock so two runs never share a workdir, and
storage failures reported in one line without touching the last valid checkpoint.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import psutil

from data.loader import process_rows, to_global
from data.tokenize import save_tokenizer
from optim.chains import nonfinite_counts
from parallel.errors import UserError
from parallel.hosts import agree, any_process, barrier
from parallel.analysis import memory_per_device
from parallel.mesh import padded_rows
from parallel.rules import activate
from train.accounting import device_peak, mfu, train_flops_per_token
from train.checkpoint import Checkpointer, has_checkpoints, latest_committed_step
from train.config import Config
from train.faults import Faults
from train.health import Health
from train.metrics import MetricsWriter, Progress, json_value
from train.preemption import PreemptionGuard
from train.setup import Setup, build, check_resumable, compile_timed
from train.state import abstract_state, count_params, init_state
from train.step import make_eval_step
from train.task_eval import task_evaluator
from train.workdir import RunLock, archive_run, ensure_writable, is_storage_failure, storage_error


def evaluate(setup: Setup, params, eval_step, max_batches: int = 0) -> float:
    """Mean loss over the validation split (the whole split unless max_batches > 0)."""
    cfg = setup.cfg.train
    bs = setup.batch_sharding
    batch_size = padded_rows(setup.mesh, cfg.eval_batch_size)  # padded rows have zero weight
    rows = process_rows(bs, batch_size)
    sums = []
    for host_batch in setup.data.eval_batches(batch_size, rows, max_batches):
        sums.append(eval_step(params, to_global(host_batch, bs, batch_size)))
        throttle(sums)
    if not sums:
        return float("nan")  # an empty validation split (e.g. data.synthetic_val_rows 0): nothing to report
    loss, weight = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    return loss / max(weight, 1.0)


def window_metrics(fetched: list[dict]) -> dict[str, float]:
    """The step's other metrics (MoE statistics, ...) averaged over the logging window; vectors become one
    flat key per entry (moe_expert_frac_0, moe_expert_frac_1, ...)."""
    out = {}
    for key in fetched[0]:
        if key in ("loss", "grad_norm", "lr", "tokens", "skipped_steps", "nonfinite_in_a_row"):
            continue  # logged above, or counted by Health
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


def say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def train(cfg: Config, workdir: Path, fresh: bool = False) -> dict:
    workdir = Path(workdir)
    resuming = has_checkpoints(workdir / "checkpoints") and not fresh
    setup = build(cfg, workdir if resuming else None)  # validates everything before any file is written
    if resuming:
        check_resumable(setup.cfg, workdir)
    is_main = jax.process_index() == 0
    agree(lambda: ensure_writable(workdir), "the workdir is not writable on another host")
    lock = RunLock(workdir) if is_main else None
    agree(lock.acquire if lock else None, "process 0 could not lock the workdir")
    try:
        if fresh and is_main and (moved := archive_run(workdir)):
            say(f"meshforge: --fresh: moved the earlier run in {workdir} to {moved}")
        if fresh:
            barrier("fresh")  # no process lists the workdir before the archive move is done
        return _train(setup, workdir, resuming)
    except Exception as e:
        if is_storage_failure(e):
            raise storage_error(workdir, e, latest_committed_step(workdir / "checkpoints")) from None
        raise
    finally:
        setup.data.close()  # stop the prefetch thread
        if lock:
            lock.release()


def _train(setup: Setup, workdir: Path, resuming: bool) -> dict:
    cfg, tc = setup.cfg, setup.cfg.train
    is_main = jax.process_index() == 0
    with activate(setup.mesh), PreemptionGuard(tc.preempt_grace_s) as preemption:
        train_step = setup.train_step()
        eval_step = make_eval_step(setup.mdef, setup.shardings["params"], setup.batch_sharding)

        ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints, keep_every=tc.keep_every)
        if resuming:
            target = abstract_state(setup.tx, setup.mdef, setup.shardings)
            state, _extra, _ = ckpt.restore_latest_valid(target, warn=lambda m: say(f"meshforge: warning: {m}"))
            setup.data.restore(_extra.get("data") or {})  # the loader continues from the saved position
        else:
            state = init_state(setup.tx, setup.mdef, setup.shardings, tc.seed)
        start = int(jax.device_get(state["step"]))
        if start >= tc.steps:
            ckpt.close()
            say(f"meshforge: {workdir} already finished {start} steps (train.steps={tc.steps}); "
                "raise --train.steps to continue")
            summary_path = workdir / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": start}

        faults = Faults()
        batch = setup.batch_fn(edit=faults.corrupt_batch)
        t_start = time.perf_counter()
        first_batch = batch(start)
        compiled, compile_s = compile_timed(train_step, state, first_batch)
        agree(lambda: check_fits(compiled), "the train step does not fit in memory on another host")

        if is_main:
            (workdir / "config.json").write_text(cfg.to_json())
            save_tokenizer(setup.data.tokenizer, workdir / "tokenizer.json")
        metrics = MetricsWriter(workdir, enabled=is_main, tensorboard=cfg.log.tensorboard)
        try:
            return _loop(setup, workdir, state, start, ckpt, metrics, resuming, compiled, first_batch, batch,
                         eval_step, preemption, faults, t_start, compile_s)
        finally:
            metrics.close()


def check_fits(compiled) -> None:
    """Refuse a step that cannot fit in memory, instead of letting the OS kill the run halfway through."""
    need = memory_per_device(compiled).get("peak")
    device = jax.local_devices()[0]
    if not need:
        return
    if device.platform == "cpu":  # every virtual CPU device lives in the one host memory
        need, have, where = need * jax.local_device_count(), psutil.virtual_memory().available, "of host memory"
    else:
        have, where = (device.memory_stats() or {}).get("bytes_limit"), "per device"
    if have and need > have:
        raise UserError(f"the train step needs {need / 2**30:.1f} GiB {where} but {have / 2**30:.1f} GiB is "
                        "available; lower train.batch_size or train.seq_len, raise optim.accum_steps, use "
                        "model.remat with model.scan_layers, or shard over more devices")


def _loop(setup: Setup, workdir: Path, state, start: int, ckpt: Checkpointer, metrics: MetricsWriter,
          resuming: bool, compiled, next_batch: dict, batch, eval_step, preemption: PreemptionGuard,
          faults: Faults, t_start: float, compile_s: float) -> dict:
    cfg, tc = setup.cfg, setup.cfg.train
    is_main = jax.process_index() == 0
    metrics.truncate_after(start)  # rows past the restored step (or any rows, for a new run) belong to no checkpoint
    progress = Progress(tc.steps, start, cfg.log.progress, enabled=is_main)
    n_params = count_params(state["params"])
    progress.log(f"meshforge: {cfg.name} | {n_params / 1e6:.2f}M params | mesh "
                 f"{dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices | "
                 f"{'resuming at step ' + str(start) if resuming else 'new run'} | workdir {workdir}")
    progress.log("config: " + json.dumps(cfg.to_dict(), separators=(",", ":")))
    progress.log(f"compiled the train step in {compile_s:.1f}s")

    # Synthetic tasks in the data: exact match of greedy samples on held-out problems, at every eval.
    task_eval = task_evaluator(setup)
    task_scores: dict = {}

    # MFU as `meshforge bench` computes it (train/accounting.py); on CPU the peak is a ~0.2 s matmul probe.
    flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
    peak, _ = device_peak(cfg.model.dtype)

    def save(step: int) -> None:
        ckpt.save(step, state, {"data": setup.data.state(step), "config": cfg.to_dict()})

    pending: list = []
    step_ms: list[float] = []
    tokens_seen = 0.0
    health = Health(tc, int(jax.device_get(nonfinite_counts(state["opt_state"])[1])), progress.log,
                    ckpt.latest_step)
    last: dict = {}
    val_loss = None
    preempted = False
    last_save_t = window_t0 = time.perf_counter()
    multi = jax.process_count() > 1
    for step in range(start, tc.steps):
        state, m = compiled(state, next_batch)
        faults.after_dispatch(step + 1, ckpt.wait)
        pending.append(m)
        throttle(pending)
        done = step + 1
        log_now = done % tc.log_every == 0 or done == tc.steps
        if done < tc.steps:
            next_batch = batch(done)  # built while the device runs the step just dispatched
        # Cross-host decisions are taken at log steps only, where the hosts synchronise anyway.
        decide = log_now or not multi
        stop = decide and any_process(preemption.requested)
        timed_save = decide and tc.checkpoint_every_s > 0 and any_process(
            time.perf_counter() - last_save_t >= tc.checkpoint_every_s)
        if log_now or stop:
            fetched = jax.device_get(pending)
            dt = time.perf_counter() - window_t0
            tokens = sum(t for x in fetched if math.isfinite(t := float(x["tokens"])))
            tokens_seen += tokens
            health.check(done - len(fetched) + 1, fetched)
            losses = [float(x["loss"]) for x in fetched]
            finite = [v for v in losses if math.isfinite(v)]
            last = {
                "loss": float(np.mean(finite)) if finite else float("nan"),
                "grad_norm": float(fetched[-1]["grad_norm"]),
                "lr": float(fetched[-1]["lr"]),
                "step_ms": 1000 * dt / len(fetched),
                "tokens_per_s": tokens / dt,
                "skipped_steps": health.skipped,
                "loss_spikes": health.spikes,
                **window_metrics(fetched),
            }
            if peak:
                last["mfu"] = mfu(last["tokens_per_s"], flops_per_token, peak, jax.device_count())
            step_ms.append(last["step_ms"])
            metrics.write(done, last)
            progress.update(done, last)
            pending = []
            window_t0 = time.perf_counter()
        evaluated = False
        if ((tc.eval_every and done % tc.eval_every == 0) or done == tc.steps) and not stop:
            val_loss = evaluate(setup, state["params"], eval_step, tc.eval_batches)
            task_scores = task_eval(state["params"]) if task_eval is not None else {}
            metrics.write(done, {"val_loss": val_loss, **task_scores})
            progress.log(f"eval at step {done}: val_loss {val_loss:.4f}"
                         + "".join(f", {k} {v:.4f}" for k, v in task_scores.items()))
            evaluated = True
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps or stop or timed_save:
            save(done)
            last_save_t = time.perf_counter()
        if evaluated:
            window_t0 = time.perf_counter()  # evaluation time is not step time
        if stop:
            preempted = True
            ckpt.wait()
            progress.log(f"meshforge: preempted: checkpoint at step {done} written; rerun the same command "
                         "to resume")
            break

    ckpt.wait()
    ckpt.close()
    wall = time.perf_counter() - t_start
    summary = {
        "name": cfg.name,
        "steps": tc.steps,
        "last_step": done,
        "steps_this_run": done - start,
        "preempted": preempted,
        "params": n_params,
        "tokens_this_run": int(tokens_seen),
        "wall_s": round(wall, 2),
        "compile_s": round(compile_s, 2),
        "tokens_per_s": round(tokens_seen / wall, 1) if wall > 0 else None,
        "step_ms_median": round(statistics.median(step_ms), 3) if step_ms else None,
        # at the median step time: the steady-state figure `meshforge bench` reports too
        "mfu": round(mfu(tokens_seen / max(done - start, 1) / (statistics.median(step_ms) / 1000), flops_per_token,
                         peak, jax.device_count()), 4) if peak and step_ms else None,
        "final_loss": last.get("loss"),
        "final_val_loss": val_loss,
        **{f"final_{k}": v for k, v in task_scores.items()},
        "skipped_steps": last.get("skipped_steps", 0),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
    }
    if is_main:
        (workdir / "summary.json").write_text(json.dumps({k: json_value(v) for k, v in summary.items()}, indent=2))
    progress.close()
    progress.log("done: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("name", "platform")))
    return summary


def restore_for_inference(cfg: Config, workdir: Path, step: int | None = None):
    """(setup, params, step) from a run's checkpoint, placed on the current mesh."""
    workdir = Path(workdir)
    if not has_checkpoints(workdir / "checkpoints"):
        raise UserError(f"{workdir}: no checkpoints to load; train first, or pass the run's --workdir")
    setup = build(cfg, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", read_only=True)  # a run may be saving into it right now
    steps = ckpt.all_steps()
    step = max(steps, default=None) if step is None else step
    if step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {workdir}; available: {', '.join(map(str, steps))}")
    with activate(setup.mesh):
        try:
            state, _ = ckpt.restore_quietly(step, abstract_state(setup.tx, setup.mdef, setup.shardings))
        except Exception as e:  # noqa: BLE001 - unreadable or made by another config: one line, not a traceback
            raise UserError(f"checkpoint {step} in {workdir} cannot be restored ({e}); it is damaged or was "
                            "written by an incompatible version or config") from None
        finally:
            ckpt.close()
    return setup, state["params"], step

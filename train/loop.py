"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint, summarise."""
from __future__ import annotations

import collections
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from data.loader import process_rows, to_global
from data.tokenize import save_tokenizer
from parallel.errors import UserError
from parallel.mesh import batch_divisor
from parallel.rules import activate
from train.checkpoint import Checkpointer, has_checkpoints
from train.config import Config
from train.metrics import MetricsWriter, Progress
from train.setup import Setup, build, check_resumable
from train.state import abstract_state, count_params, init_state
from train.step import make_eval_step, make_train_step
from train.task_eval import TaskEvaluator

# Steps dispatched but not finished. Unbounded run-ahead (the host is faster than the step, e.g. with a prefetched
# loader) made XLA:CPU (jax 0.10.2, 2 virtual devices, loaded host) abort in a collective's rendezvous within a
# few hundred steps (a 20-line pure-JAX repro did the same); two in flight keep the device busy and never stalled.
MAX_STEPS_IN_FLIGHT = 2


def evaluate(setup: Setup, params, eval_step, max_batches: int = 0) -> float:
    """Mean loss over the validation split (the whole split unless max_batches > 0)."""
    cfg = setup.cfg.train
    bs = setup.batch_sharding
    div = batch_divisor(setup.mesh)
    batch_size = -(-cfg.eval_batch_size // div) * div  # padded rows have zero weight
    rows = process_rows(bs, batch_size)
    sums = []
    for host_batch in setup.data.eval_batches(batch_size, rows, max_batches):
        sums.append(eval_step(params, to_global(host_batch, bs, batch_size)))
    loss, weight = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    return loss / max(weight, 1.0)


def train(cfg: Config, workdir: Path) -> dict:
    workdir = Path(workdir)
    resuming = has_checkpoints(workdir / "checkpoints")
    setup = build(cfg, workdir if resuming else None)  # validates everything before any file is written
    cfg = setup.cfg
    if resuming:
        check_resumable(cfg, workdir)
    is_main = jax.process_index() == 0
    tc = cfg.train

    with activate(setup.mesh):
        train_step = make_train_step(setup.mdef, setup.tx, setup.schedule, accum_steps=cfg.optim.accum_steps,
                                     seed=tc.seed, state_shardings=setup.shardings,
                                     batch_sharding=setup.batch_sharding)
        eval_step = make_eval_step(setup.mdef, setup.shardings["params"], setup.batch_sharding)

        ckpt = Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
        if resuming:
            step0 = ckpt.latest_step()
            target = abstract_state(setup.tx, setup.mdef, setup.shardings)
            state, _extra = ckpt.restore(step0, target)
            setup.data.restore(_extra.get("data") or {})  # the loader continues from the saved position
        else:
            state = init_state(setup.tx, setup.mdef, setup.shardings, tc.seed)
        start = int(jax.device_get(state["step"]))
        if start >= tc.steps:
            ckpt.close()
            summary_path = workdir / "summary.json"
            print(f"meshforge: {workdir} already finished {start} steps (train.steps={tc.steps}); "
                  "raise --train.steps to continue")
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": start}

        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(cfg.to_json())
            save_tokenizer(setup.data.tokenizer, workdir / "tokenizer.json")
        metrics = MetricsWriter(workdir, enabled=is_main, tensorboard=cfg.log.tensorboard)
        if resuming:
            metrics.truncate_after(start)
        progress = Progress(tc.steps, start, cfg.log.progress, enabled=is_main)
        n_params = count_params(state["params"])
        progress.log(f"meshforge: {cfg.name} | {n_params / 1e6:.2f}M params | mesh "
                     f"{dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices | "
                     f"{'resuming at step ' + str(start) if resuming else 'new run'} | workdir {workdir}")

        # Synthetic tasks in the data: exact match of greedy samples on held-out problems, at every eval.
        task_eval = TaskEvaluator(setup) if setup.data.tasks and cfg.model.causal else None
        task_scores: dict = {}

        rows = process_rows(setup.batch_sharding, tc.batch_size)
        batch = lambda s: to_global(setup.data.train_batch(s, rows), setup.batch_sharding, tc.batch_size)  # noqa: E731

        t_start = time.perf_counter()
        next_batch = batch(start)
        compiled = train_step.lower(state, next_batch).compile()
        compile_s = time.perf_counter() - t_start
        progress.log(f"compiled the train step in {compile_s:.1f}s")

        pending: list = []
        in_flight: collections.deque = collections.deque()
        step_ms: list[float] = []
        tokens_seen = 0
        last = {}
        val_loss = None
        window_t0 = time.perf_counter()
        for step in range(start, tc.steps):
            state, m = compiled(state, next_batch)
            pending.append(m)
            in_flight.append(m["loss"])
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            done = step + 1
            if done < tc.steps:
                next_batch = batch(done)  # built while the device runs the step just dispatched
            if done % tc.log_every == 0 or done == tc.steps:
                fetched = jax.device_get(pending)
                dt = time.perf_counter() - window_t0
                tokens = sum(float(x["tokens"]) for x in fetched)
                tokens_seen += tokens
                last = {
                    "loss": float(np.mean([x["loss"] for x in fetched])),
                    "grad_norm": float(fetched[-1]["grad_norm"]),
                    "lr": float(fetched[-1]["lr"]),
                    "step_ms": 1000 * dt / len(fetched),
                    "tokens_per_s": tokens / dt,
                }
                step_ms.append(last["step_ms"])
                metrics.write(done, last)
                progress.update(done, last)
                pending = []
                window_t0 = time.perf_counter()
            evaluated = False
            if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
                val_loss = evaluate(setup, state["params"], eval_step, tc.eval_batches)
                task_scores = task_eval(state["params"]) if task_eval is not None else {}
                metrics.write(done, {"val_loss": val_loss, **task_scores})
                progress.log(f"eval at step {done}: val_loss {val_loss:.4f}"
                             + "".join(f", {k} {v:.4f}" for k, v in task_scores.items()))
                evaluated = True
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
                ckpt.save(done, state, {"data": setup.data.state(done), "config": cfg.to_dict()})
            if evaluated:
                window_t0 = time.perf_counter()  # evaluation time is not step time

        ckpt.wait()
        ckpt.close()
        wall = time.perf_counter() - t_start
        trained = tc.steps - start
        summary = {
            "name": cfg.name,
            "steps": tc.steps,
            "steps_this_run": trained,
            "params": n_params,
            "tokens_this_run": int(tokens_seen),
            "wall_s": round(wall, 2),
            "compile_s": round(compile_s, 2),
            "tokens_per_s": round(tokens_seen / wall, 1) if wall > 0 else None,
            "step_ms_median": round(statistics.median(step_ms), 3) if step_ms else None,
            "final_loss": last.get("loss"),
            "final_val_loss": val_loss,
            **{f"final_{k}": v for k, v in task_scores.items()},
            "devices": jax.device_count(),
            "platform": jax.devices()[0].platform,
        }
        if is_main:
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        progress.close()
        progress.log("done: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("name", "platform")))
        metrics.close()
        return summary


def restore_for_inference(cfg: Config, workdir: Path, step: int | None = None):
    """(setup, params, step) from a run's checkpoint, placed on the current mesh."""
    workdir = Path(workdir)
    if not has_checkpoints(workdir / "checkpoints"):
        raise UserError(f"{workdir}: no checkpoints to load; train first, or pass the run's --workdir")
    setup = build(cfg, workdir)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    steps = ckpt.all_steps()
    step = ckpt.latest_step() if step is None else step
    if step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {workdir}; available: {', '.join(map(str, steps))}")
    with activate(setup.mesh):
        state, _ = ckpt.restore(step, abstract_state(setup.tx, setup.mdef, setup.shardings))
    ckpt.close()
    return setup, state["params"], step

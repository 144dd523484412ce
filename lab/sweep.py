"""`meshforge sweep EXPERIMENT --space SPACE.py --trials N`: an Optuna search over any config keys.

SPACE.py defines `space(trial)` with Optuna's define-by-run API and returns dotted config keys and their values:

    def space(trial):
        return {"optim.lr": trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True),
                "optim.warmup_steps": trial.suggest_int("optim.warmup_steps", 0, 200)}

Each trial is a normal meshforge run (train.loop.train, in this process) in SWEEP_DIR/trial_<number>: its validation
loss at each evaluation goes to the pruner, its final validation loss is the objective. The study lives in any
Optuna storage, so workers on many machines can share it (lab/sweep_study.py: counting, stale trials, files).
With several processes (jax.distributed) every process runs each trial and process 0 alone talks to the study: it
hands each trial's values and each prune decision to the others.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lab.sweep_study import HEARTBEAT, HEARTBEAT_S, OWNER, RETRY_OF, Heartbeat, best_trial, default_storage, \
    finished, open_storage, owner, rank, requeue_stale, set_aside, shown, tally, trial_id, write_best, write_trials
from parallel.errors import UserError
from train.config import SECTIONS, Config, apply_overrides, field_types, parse_value
from train.hardware import cpu_model
from train.health import RunStopped, TrainingHalted
from train.workdir import StorageError

CHECK_SAMPLES = 16  # random draws from the space checked (keys, types) before the sweep starts
# A worker whose first trials all fail in their runs with one same error (a missing data file, a broken
# environment) stops instead of burning the whole study on it; once one of its trials ran, it never does.
SAME_ERROR_LIMIT = 3


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs, checked before any storage or device is touched."""
    experiment: Path
    base: Config  # the experiment with the sweep-wide overrides
    overrides: dict[str, str]  # the sweep-wide overrides as given (best_experiment.py repeats them)
    space_path: Path
    space: Callable[[optuna.Trial], dict]
    trials: int
    workdir: Path
    study: str
    storage: str
    default_storage: bool
    pruner: str = "median"
    sampler: str = "tpe"
    seed: int | None = None
    prune_startup: int = 3
    prune_warmup: int = 0
    stale_after: float = 120.0
    command: str = ""


class Pruned(RunStopped):
    """The pruner ended the trial's run after the evaluation at `step`."""

    def __init__(self, step: int, val_loss: float):
        super().__init__(f"pruned at step {step}")
        self.step, self.val_loss = step, val_loss


@dataclasses.dataclass
class Outcome:
    state: str  # COMPLETE, PRUNED, FAIL, or REQUEUE (stopped by SIGTERM: run it again later)
    value: float | None = None
    step: int | None = None  # PRUNED: the evaluation that pruned it
    error: str = ""
    seconds: float = 0.0
    from_space: bool = False  # FAIL: the trial's values themselves were refused (not its run)


# ------------------------------------------------------------------------------------------ the search space


def _line_in(e: BaseException, path: Path) -> str:
    """Where in the user's file an exception came from ('line 12'), or ''."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f" at line {e.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" at line {lines[-1]}" if lines else ""


def load_space(path: str) -> Callable[[optuna.Trial], dict]:
    """SPACE.py's space(trial)."""
    p = Path(path)
    example = "def space(trial): return {'optim.lr': trial.suggest_float('optim.lr', 1e-4, 1e-2, log=True)}"
    if not p.is_file():
        raise UserError(f"--space {path}: no such file; give a Python file with {example}")
    spec = importlib.util.spec_from_file_location(f"meshforge_space_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: its error in one line, with the line
        raise UserError(f"--space {path}: {type(e).__name__}{_line_in(e, p)}: {e}") from None
    if not callable(getattr(module, "space", None)):
        raise UserError(f"--space {path}: it must define space(trial), e.g. {example}")
    return module.space


def call_space(space: Callable, trial: optuna.Trial, path: Path) -> dict[str, Any]:
    """The config keys and values space(trial) picks for this trial."""
    try:
        values = space(trial)
    except Exception as e:  # noqa: BLE001 - the user's code
        raise UserError(f"--space {path}: space(trial) raised {type(e).__name__}{_line_in(e, path)}: {e}") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise UserError(f"--space {path}: space(trial) must return a dict of config keys to values, like "
                        f"{{'optim.lr': trial.suggest_float(...)}}; got {type(values).__name__}")
    # numpy scalars (a value computed with numpy) become plain numbers: the study stores the values as JSON
    return {k: v.item() if type(v).__module__ == "numpy" and hasattr(v, "item") else v for k, v in values.items()}


def check_keys(base: Config, values: dict[str, Any], overrides: dict[str, str], path: Path) -> None:
    """Keys that do not exist, values of the wrong type, keys also fixed on the command line: the space is wrong
    whatever the trial. (Combinations a section refuses, like d_model 96 with 5 heads, fail only their trial.)"""
    for key, value in values.items():
        if key in overrides:
            raise UserError(f"--space {path}: {key} is searched and also fixed on the command line (--{key}); drop "
                            "one of them")
        if key == "name":
            continue
        section, _, field = key.partition(".")
        types = field_types(getattr(base, section)) if section in SECTIONS else {}
        try:
            if field not in types:
                apply_overrides(base, {key: value})  # raises the unknown-key error, with the close matches
            parse_value(key, value, types[field])
        except UserError as e:
            raise UserError(f"--space {path}: {str(e).removeprefix('--')}") from None


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The trial's run config; UserError for values its sections refuse."""
    cfg = apply_overrides(base, values)
    if cfg.log.progress == "auto":
        # A pruned or failed run leaves the loop by an exception, past the line that closes a terminal's live bar;
        # with plain lines nothing of one trial is left on the screen while the next runs.
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress="lines"))
    return cfg


def check_space(space: Callable, path: Path, base: Config, overrides: dict[str, str]) -> Config:
    """Draw CHECK_SAMPLES random points from the space (an in-memory study: nothing is written) and check their
    keys and types. Returns the first draw's config, which sizes the CPU devices (as `train` does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    first = None
    for _ in range(CHECK_SAMPLES):
        values = call_space(space, study.ask(), path)
        check_keys(base, values, overrides, path)
        if first is None:
            try:
                first = trial_config(base, values)
            except UserError:
                first = base  # a combination this one trial would fail with
    return first or base


def prepare(args, base: Config, overrides: dict[str, str], command: str) -> tuple[SweepSpec, Config]:
    """The sweep of `meshforge sweep` (args: its parsed flags; base: the experiment with `overrides` applied), and
    the config of its first trial. Reads only the space file: no storage, no devices."""
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.stale_after < 2 * HEARTBEAT_S:
        raise UserError(f"--stale-after must be at least {2 * HEARTBEAT_S:.0f} seconds (heartbeats come every "
                        f"{HEARTBEAT_S:.0f} s), got {args.stale_after}")
    if args.prune_startup < 0 or args.prune_warmup < 0:
        raise UserError("--prune-startup and --prune-warmup must be >= 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep's own line per trial says it all
    space_path = Path(args.space)
    space = load_space(args.space)
    first = check_space(space, space_path, base, overrides)
    workdir = Path(args.workdir) if args.workdir else Path("runs") / "sweeps" / (args.study or base.name)
    spec = SweepSpec(
        experiment=Path(args.experiment), base=base, overrides=dict(overrides), space_path=space_path, space=space,
        trials=args.trials, workdir=workdir, study=args.study or base.name,
        storage=args.storage or default_storage(workdir), default_storage=not args.storage, pruner=args.pruner,
        sampler=args.sampler, seed=args.seed, prune_startup=args.prune_startup, prune_warmup=args.prune_warmup,
        stale_after=args.stale_after, command=command)
    return spec, first


# ------------------------------------------------------------------------------------------------ the study


def make_sampler(spec: SweepSpec, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    # A resumed sweep must not draw again what its first start drew: the seed moves on with the study's trials.
    seed = None if spec.seed is None else spec.seed + trials_so_far
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: workers sharing the study treat each other's running trials as bad points, so they do not
    # all try the same promising spot at once
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":  # resources are train steps, from the first evaluation to the whole run
        steps = spec.base.train.steps
        return optuna.pruners.HyperbandPruner(min_resource=min(spec.base.train.eval_every or steps, steps),
                                              max_resource=steps, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup, n_warmup_steps=spec.prune_warmup)


def open_study(spec: SweepSpec) -> optuna.Study:
    """The study, created if new. The sweep's folder is made only once the storage opened (the default SQLite
    file lives in it)."""
    if spec.default_storage:
        spec.workdir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(spec.storage)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(storage=storage, study_name=spec.study, direction="minimize",
                                        load_if_exists=True, pruner=make_pruner(spec))
            study.sampler = make_sampler(spec, len(study.get_trials(deepcopy=False)))
    except ValueError as e:  # e.g. a study of that name that maximises
        raise UserError(f"--study {spec.study}: {e}; give another --study") from None
    spec.workdir.mkdir(parents=True, exist_ok=True)
    check_same_search(study, spec)
    if not study.user_attrs:  # what the study is a search of, for whoever opens it later (meshforge report)
        for key, value in (("experiment", str(spec.experiment)), ("space", str(spec.space_path)),
                           ("overrides", spec.overrides), ("command", spec.command), ("metric", "val_loss")):
            study.set_user_attr(key, value)
    return study


def check_same_search(study: optuna.Study, spec: SweepSpec) -> None:
    """A sweep folder holds one study (trial folders are named by number), and a study one search: joining it
    with another experiment, space or overrides would mix results that cannot be compared."""
    listed = spec.workdir / "trials.json"
    if listed.is_file():
        other = json.loads(listed.read_text()).get("study")
        if other not in (None, spec.study):
            raise UserError(f"--workdir {spec.workdir}: holds the trials of study {other!r}, not {spec.study!r}; "
                            f"give another --workdir (or --study {other} to continue that one)")
    was = study.user_attrs
    now = {"experiment": str(spec.experiment), "space": str(spec.space_path), "overrides": spec.overrides}
    for key, value in now.items():
        if key in was and was[key] != value:
            raise UserError(f"--study {spec.study}: the study was started with {key} {was[key]!r}, not {value!r}; "
                            "rerun it with the same ones, or give another --study")


def say(msg: str) -> None:
    print(msg, flush=True)


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Driver:
    """Process 0's side of a sweep: which trial runs next, the pruner's questions, and what each trial came to."""

    def __init__(self, spec: SweepSpec, study: optuna.Study):
        self.spec, self.study = spec, study
        self.trial: optuna.Trial | None = None
        self.failures: list[str] | None = []  # this worker's run errors until its first trial that ran; then None

    def start(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        say(f"sweep: study {self.spec.study!r} in {shown(self.spec.storage)}: {finished(trials)} of "
            f"{self.spec.trials} trials finished; trial runs in {self.spec.workdir}/trial_<number>")

    def next_job(self) -> dict | None:
        """The next trial for every process to run: its number, config values and workdir; or None when this
        worker is done; or {'stop': error}."""
        if self.failures and len(self.failures) >= SAME_ERROR_LIMIT and len(set(self.failures)) == 1:
            return {"stop": f"the first {SAME_ERROR_LIMIT} trials all failed with the same error, so the search "
                            f"space is not to blame: {self.failures[0]}"}
        while True:
            for number in requeue_stale(self.study, self.spec.stale_after):
                say(f"sweep: trial {number}'s worker died; it is queued again and resumes from its checkpoints")
            trials = self.study.get_trials(deepcopy=False)
            counts = tally(trials)
            if finished(trials) >= self.spec.trials:
                return None
            if not counts.get("WAITING") and sum(counts.values()) >= self.spec.trials:
                say(f"sweep: the last {counts.get('RUNNING', 0)} trials are running in other workers")
                return None
            trial = self._claim()
            if trial is None:
                continue  # a surplus trial: the checks above end this worker
            resumes = "workdir" in trial.user_attrs  # a re-queued trial: its run continues
            workdir = trial.user_attrs.get("workdir") or str((self.spec.workdir / f"trial_{trial.number}").resolve())
            trial.set_user_attr("workdir", workdir)
            try:
                values = call_space(self.spec.space, trial, self.spec.space_path)
            except UserError as e:
                self.record(Outcome("FAIL", error=str(e), from_space=True), {"number": trial.number, "values": {}})
                continue
            trial.set_user_attr("config", values)
            retry_of = self.study._storage.get_trial(trial_id(self.study, trial.number)).system_attrs.get(RETRY_OF)
            return {"number": trial.number, "values": values, "workdir": workdir, "fresh": not resumes,
                    "retry_of": retry_of}

    def _claim(self) -> optuna.Trial | None:
        """Ask the study for a trial (a queued one first) and mark it this worker's; None if it came too late to
        be one of the sweep's N (see lab/sweep_study.py)."""
        trial = self.study.ask()
        storage, tid = self.study._storage, trial_id(self.study, trial.number)
        storage.set_trial_system_attr(tid, OWNER, owner())
        storage.set_trial_system_attr(tid, HEARTBEAT, time.time())
        if rank(self.study.get_trials(deepcopy=False), trial.number) >= self.spec.trials:
            set_aside(self.study, storage.get_trial(tid), "surplus: other workers took the sweep's last trials",
                      retry=False)
            return None
        self.trial = trial
        return trial

    def should_prune(self, step: int, val_loss: float, last_step: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resumed trial evaluates again at steps it already reported
            self.trial.report(val_loss, step)
        # The run's last evaluation is its result: pruning there would only throw it away.
        return self.spec.prune_warmup <= step < last_step and bool(self.trial.should_prune())

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.study._storage, trial_id(self.study, self.trial.number))

    def record(self, outcome: Outcome, job: dict) -> None:
        trial, self.trial = self.trial, None
        try:
            trial.set_user_attr("seconds", round(outcome.seconds, 1))
            if outcome.state == "COMPLETE":
                self.study.tell(trial, outcome.value)
            elif outcome.state == "PRUNED":
                trial.set_user_attr("pruned_at", outcome.step)
                self.study.tell(trial, state=TrialState.PRUNED)
            elif outcome.state == "FAIL":
                trial.set_user_attr("error", outcome.error)
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                set_aside(self.study, self.study._storage.get_trial(trial_id(self.study, trial.number)),
                          outcome.error, retry=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            print(f"meshforge: warning: trial {trial.number} was declared stale by another worker (heartbeats "
                  f"late by more than --stale-after {self.spec.stale_after:.0f} s) and queued again; this run's "
                  f"result stays in {job.get('workdir')} only", file=sys.stderr)
        if self.failures is not None and not outcome.from_space:
            self.failures = self.failures + [outcome.error] if outcome.state == "FAIL" else None
        self._print(trial.number, job, outcome)
        try:
            write_trials(self.study, self.spec.workdir / "trials.json")
        except OSError as e:  # a full disk stops the trial's run with its own one-line error; this is only a copy
            print(f"meshforge: warning: cannot write trials.json ({e.strerror}); the study has every trial",
                  file=sys.stderr)

    def _print(self, number: int, job: dict, outcome: Outcome) -> None:
        what = {"COMPLETE": f"val_loss {fmt(outcome.value)}",
                "PRUNED": f"pruned at step {outcome.step} (val_loss {fmt(outcome.value)})",
                "FAIL": f"failed: {outcome.error}", "REQUEUE": f"stopped: {outcome.error}"}[outcome.state]
        params = " ".join(f"{k}={fmt(v)}" for k, v in job.get("values", {}).items())
        again = f" (trial {job['retry_of']} resumed)" if job.get("retry_of") is not None else ""
        say(f"trial {number}{again} | {params} | {what} | {outcome.seconds:.1f}s")

    def finish(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        write_trials(self.study, self.spec.workdir / "trials.json")
        counts = tally(trials)
        summary = ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
        best = best_trial(self.study)
        if best is None:
            say(f"sweep: {finished(trials)} of {self.spec.trials} trials finished ({summary}); none completed, so "
                "there is no best trial yet")
            return
        values = best.user_attrs.get("config", best.params)
        steps = trial_config(self.spec.base, values).train.steps
        path = self.spec.workdir / "best_experiment.py"
        write_best(self.study, best, path, self.spec.experiment, self.spec.overrides, self.spec.base.name, steps,
                   self.spec.command, shown(self.spec.storage), hardware())
        say(f"sweep: {finished(trials)} of {self.spec.trials} trials finished ({summary}); best: trial {best.number}, "
            f"val_loss {fmt(best.value)}, " + " ".join(f"{k}={fmt(v)}" for k, v in values.items()))
        say(f"sweep: wrote {path} (meshforge train {path}) and {self.spec.workdir / 'trials.json'}")


def hardware() -> str:
    import jax

    kind = jax.devices()[0].device_kind
    if jax.devices()[0].platform == "cpu":
        kind = f"{cpu_model()} CPU"
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{jax.device_count()} x {kind} device{'s' if jax.device_count() > 1 else ''}{processes}"


# -------------------------------------------------------------------------------------------- every process


def from_main(fn: Callable[[], Any] | None) -> Any:
    """fn() on process 0 (fn is None elsewhere), its result on every process. If it raises there (a storage
    failure, say), every process raises too, instead of the others waiting in the next broadcast for ever."""
    import jax

    if jax.process_count() == 1:
        return fn() if fn else None
    failure = None
    try:
        result = {"value": fn() if fn else None}
    except Exception as e:  # noqa: BLE001 (shared, then raised again below)
        failure, result = e, {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              "user": isinstance(e, UserError)}
    result = share(result)
    if failure is not None:
        raise failure
    if "error" in result:
        raise (UserError if result["user"] else RuntimeError)(f"process 0: {result['error']}")
    return result["value"]


def share(value: Any) -> Any:
    """Process 0's JSON value, on every process."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    data = json.dumps(value).encode() if jax.process_index() == 0 else b""
    n = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int32)))
    buf = np.frombuffer(data, np.uint8) if data else np.zeros(n, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8).tobytes())


def pruning_hook(driver: Driver | None, last_step: int) -> Callable[[int, float], None]:
    def on_eval(step: int, val_loss: float) -> None:
        if from_main((lambda: driver.should_prune(step, val_loss, last_step)) if driver else None):
            raise Pruned(step, val_loss)
    return on_eval


def run_trial(spec: SweepSpec, job: dict, driver: Driver | None, initial: Callable | None = None) -> Outcome:
    """One trial's run, on every process (initial: pretrained parameters, train.init_from). Bugs, Ctrl-C and
    storage failures propagate."""
    import jax

    from train.loop import train

    t0 = time.perf_counter()
    try:
        cfg = trial_config(spec.base, job["values"])
    except UserError as e:  # a combination a config section refuses: the space's doing
        return Outcome("FAIL", error=str(e), from_space=True)
    try:
        summary = train(cfg, Path(job["workdir"]), fresh=job["fresh"], initial=initial,
                        on_eval=pruning_hook(driver, cfg.train.steps))
    except Pruned as p:
        return Outcome("PRUNED", value=p.val_loss, step=p.step, seconds=time.perf_counter() - t0)
    except StorageError:
        raise
    except (UserError, TrainingHalted) as e:
        return Outcome("FAIL", error=str(e), seconds=time.perf_counter() - t0)
    finally:
        jax.clear_caches()  # every trial compiles its own programs: do not keep them all
        gc.collect()
    seconds = time.perf_counter() - t0
    if summary.get("preempted"):
        return Outcome("REQUEUE", error="SIGTERM: checkpointed and queued again; rerun the sweep to resume it",
                       seconds=seconds)
    value = summary.get("final_val_loss")
    if value is None or not math.isfinite(value):
        return Outcome("FAIL", error=f"no finite validation loss at the end ({value}); give the data a validation "
                                     "split (data.val_fraction)", seconds=seconds)
    return Outcome("COMPLETE", value=float(value), seconds=seconds)


def run_sweep(spec: SweepSpec, initial: Callable | None = None) -> int:
    """Run trials until the study holds spec.trials counted finished trials (or the rest run elsewhere).
    initial(mdef, param_shardings): the pretrained parameters every new trial starts from (train.init_from)."""
    import jax

    from parallel.hosts import agree

    main = jax.process_index() == 0
    opened: list[optuna.Study] = []
    agree((lambda: opened.append(open_study(spec))) if main else None, "process 0 could not open the study")
    driver = Driver(spec, opened[0]) if main else None
    if driver:
        driver.start()
    while (job := from_main(driver.next_job if driver else None)) is not None:
        if "stop" in job:
            raise UserError(job["stop"])
        try:
            with driver.heartbeat() if driver else nullcontext():
                outcome = run_trial(spec, job, driver, initial)
        except (KeyboardInterrupt, StorageError) as e:  # not the trial's doing: it runs again on the next start
            if driver:
                why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else str(e)
                driver.record(Outcome("REQUEUE", error=f"{why}; queued again"), job)
            raise
        except BaseException as e:  # a bug: the trial fails, the sweep stops with the traceback
            if driver:
                driver.record(Outcome("FAIL", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"),
                              job)
            raise
        if driver:
            driver.record(outcome, job)
        if outcome.state == "REQUEUE":
            break  # SIGTERM: leave now, as a train run does
    if driver:
        driver.finish()
    return 0

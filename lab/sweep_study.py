"""The Optuna side of `meshforge sweep`: storage URLs, which trials count, stale trials, and the files a sweep leaves.

Counting. A sweep of N trials is done when the study holds N *counted* finished trials (COMPLETE, PRUNED or FAIL).
A trial whose process died (or was stopped by SIGTERM / Ctrl-C) is not a result: it is marked FAIL with the attr
below, does not count, and goes back to the queue as a new WAITING trial with the same parameters and workdir, so
its run resumes from its checkpoints. The counted trials are ordered by number, and only the first N of them are
the sweep's: a worker that asked for a trial while its peers took the last slots (two asks at the same moment)
drops it uncounted. So any number of workers, started and killed in any order, end with exactly N.

Stale trials. The worker running a trial writes a heartbeat (wall time) into it every HEARTBEAT_S seconds, and its
owner: the kernel boot, the PID namespace, the PID and the process's start time. A RUNNING trial is stale when its
owner is visibly dead (same kernel and PID namespace, the process is gone or is another one now), or, seen from
another machine, when its heartbeat is older than --stale-after seconds. Failing a trial is atomic in every
Optuna storage (a second attempt raises UpdateFinishedTrialError), so of two workers that find the same stale
trial exactly one re-queues it.
"""
from __future__ import annotations

import functools
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from parallel.errors import UserError

UNCOUNTED = "meshforge:uncounted"  # system attr: this FAIL is a dead or surplus trial, not a result
OWNER = "meshforge:owner"  # system attr: {"machine", "pid", "start"} of the worker running the trial
HEARTBEAT = "meshforge:heartbeat"  # system attr: the owner's wall time, refreshed every HEARTBEAT_S seconds
RETRY_OF = "meshforge:retry_of"  # system attr: the number of the dead trial this one repeats
HEARTBEAT_S = 15.0


# ---------------------------------------------------------------------------------------------------- storage


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir.resolve() / 'study.db'}"


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or ("://" not in url and url.endswith((".log", ".jsonl")))


def shown(url: str) -> str:
    """The URL without its password, for messages and files."""
    if is_journal(url):
        return url
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given; opening it reports the problem
        return url


def open_storage(url: str) -> BaseStorage:
    """An Optuna storage for `url`: a journal file (journal:PATH, or a path ending in .log / .jsonl) or any
    SQLAlchemy URL. Every way it can fail to open is a one-line UserError."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:")).expanduser()
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise UserError(f"--storage {url}: cannot open the journal file ({e.strerror}); give a path in a "
                            "writable folder that exists") from None
    import sqlalchemy.exc

    dialect = url.split(":", 1)[0].split("+", 1)[0]
    # A database that does not answer must fail in seconds, not after the driver's default (minutes); SQLite's
    # timeout is how long a writer waits for a peer's lock.
    connect = {"timeout": 60} if dialect == "sqlite" else {"connect_timeout": 10} if dialect in (
        "postgresql", "mysql", "mariadb") else {}
    for attempt in range(3):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect} if connect else None)
            return optuna.storages.get_storage(storage)  # the cached wrapper create_study makes: share one object
        except ImportError:
            raise UserError(f"--storage {shown(url)}: the database driver for {dialect} is not installed (e.g. pip "
                            "install psycopg2-binary for postgresql, pymysql for mysql)") from None
        except (sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            racing = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in first or "locked" in first
            if attempt < 2 and racing:
                time.sleep(1.0)  # two workers creating the tables of a new database at once: the second one waits
                continue
            raise UserError(f"--storage {shown(url)}: cannot open the study storage ({first[:300]}); give a "
                            "reachable database URL, sqlite:///PATH, or journal:PATH") from None


# ------------------------------------------------------------------------------------------- counting trials


def counted(t: FrozenTrial) -> bool:
    return not t.system_attrs.get(UNCOUNTED)


def tally(trials: list[FrozenTrial]) -> dict[str, int]:
    """Counted trials by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    out: dict[str, int] = {}
    for t in trials:
        if counted(t):
            out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finished(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if counted(t) and t.state.is_finished())


def rank(trials: list[FrozenTrial], number: int) -> int:
    """How many counted trials come before trial `number`: it is one of the sweep's N when this is below N."""
    return sum(1 for t in trials if counted(t) and t.number < number)


# -------------------------------------------------------------------------------------- owners and heartbeats


def machine() -> str | None:
    """Processes with the same value see the same PIDs: one kernel boot and one PID namespace (None: unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID apart); None if there is none
    running (a zombie is dead too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner() -> dict[str, Any]:
    return {"machine": machine(), "pid": os.getpid(), "start": process_start(os.getpid())}


def is_stale(t: FrozenTrial, stale_after: float, here: str | None, now: float | None = None) -> bool:
    """Whether a RUNNING trial's worker is gone (see the module docstring)."""
    who = t.system_attrs.get(OWNER)
    if isinstance(who, dict) and here is not None and who.get("machine") == here:
        return process_start(int(who["pid"])) != who.get("start")
    beat = t.system_attrs.get(HEARTBEAT)
    if beat is None:  # killed between its ask and its first heartbeat: its start is the last sign of life
        beat = t.datetime_start.timestamp() if t.datetime_start else None
    now = time.time() if now is None else now
    return beat is not None and now - float(beat) > stale_after


class Heartbeat:
    """Refresh a running trial's heartbeat from a background thread (the trial's run holds the main thread)."""

    def __init__(self, storage: BaseStorage, trial_id: int):
        import threading

        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="meshforge-sweep-heartbeat")

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001 - a finished trial (another worker declared it stale) or a blip
                pass

    def __enter__(self) -> "Heartbeat":
        self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of a trial. Failing a dead peer's trial and writing system attrs go through the storage
    API (public), which Optuna reaches only through the study's private _storage and _study_id."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def set_aside(study: optuna.Study, t: FrozenTrial, why: str, retry: bool) -> bool:
    """Fail a RUNNING trial uncounted with `why` as its error, and with `retry` queue a copy (same parameters,
    workdir and evaluations) as a WAITING trial. False if another worker finished it first."""
    storage, tid = study._storage, trial_id(study, t.number)
    try:
        storage.set_trial_system_attr(tid, UNCOUNTED, True)
        storage.set_trial_user_attr(tid, "error", why)
        if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker failed it first, and re-queued it
    if retry:
        attrs = {k: v for k, v in t.user_attrs.items() if k not in ("error", "seconds")}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs=attrs,
            system_attrs={RETRY_OF: t.system_attrs.get(RETRY_OF, t.number)},
            intermediate_values=t.intermediate_values))
    return True


def requeue_stale(study: optuna.Study, stale_after: float) -> list[int]:
    """Re-queue every RUNNING trial whose worker is gone; the numbers of those this call re-queued."""
    here, out = machine(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, stale_after, here) and set_aside(study, t, "its worker died; re-queued", retry=True):
            out.append(t.number)
    return out


# ------------------------------------------------------------------------------------------- output files


def trial_record(t: FrozenTrial) -> dict:
    return {
        "number": t.number, "state": t.state.name, "counted": counted(t), "params": t.params, "value": t.value,
        "error": t.user_attrs.get("error"), "pruned_at": t.user_attrs.get("pruned_at"),
        "workdir": t.user_attrs.get("workdir"), "seconds": t.user_attrs.get("seconds"),
        "retry_of": t.system_attrs.get(RETRY_OF), "config": t.user_attrs.get("config"),
        "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader (meshforge report) never sees half a file


def write_trials(study: optuna.Study, path: Path) -> None:
    """trials.json: every trial of the study (other workers' too), for `meshforge report`."""
    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    write_atomic(path, json.dumps({"study": study.study_name, "direction": "minimize", "metric": "val_loss",
                                   "trials": trials}, indent=2, default=str))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(done, key=lambda t: (t.value, t.number), default=None)


BEST = '''r"""{doc}
"""
import dataclasses
from pathlib import Path

from train.config import apply_overrides, load_experiment

EXPERIMENT = {experiment}
OVERRIDES = {{  # the sweep's command-line overrides, then the trial's values
{overrides}}}


def get_config():
    cfg = apply_overrides(load_experiment(str(EXPERIMENT)), OVERRIDES)
    return dataclasses.replace(cfg, name={name!r})
'''


def experiment_expr(experiment: Path, folder: Path) -> str:
    """Python for the experiment's path: relative to the written file when both lie under the current folder (a
    checkout that moves keeps working), absolute otherwise."""
    here, exp, folder = Path.cwd().resolve(), experiment.resolve(), folder.resolve()
    if exp.is_relative_to(here) and folder.is_relative_to(here):
        return f"Path(__file__).resolve().parent / {os.path.relpath(exp, folder)!r}"
    return f"Path({str(exp)!r})"


def wrap_command(command: str, width: int = 108) -> str:
    """A shell command over several lines, each cut between two words and continued with a backslash."""
    import shlex

    lines = [""]
    for word in map(shlex.quote, shlex.split(command)):
        if lines[-1] and len(lines[-1]) + len(word) + 1 > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
    return " \\\n        ".join(lines)


def write_best(study: optuna.Study, best: FrozenTrial, path: Path, experiment: Path, overrides: dict[str, str],
               name: str, steps: int, command: str, storage: str, hardware: str) -> None:
    """best_experiment.py: an experiment file that reproduces the `best` trial (its values: the `config` user
    attr, what space(trial) returned)."""
    values = {**overrides, **best.user_attrs.get("config", best.params)}
    fill = functools.partial(textwrap.fill, width=116, break_on_hyphens=False)
    doc = "\n\n".join([
        f"The best trial of the sweep {study.study_name!r}: trial {best.number}, validation loss {best.value:.6g} "
        f"after {steps} steps.",
        f"    meshforge train {path}",
        fill(f"Hardware: {hardware}. Result: validation loss {best.value:.6g}, measured by the sweep (the trial's "
             f"run, with its config.json and summary.json: {best.user_attrs.get('workdir')}). The experiment "
             f"{experiment} with the values below."),
        fill(f"The sweep ({finished(study.get_trials(deepcopy=False))} counted trials in {storage}):"),
        f"    {wrap_command(command)}"])
    write_atomic(path, BEST.format(doc=doc, experiment=experiment_expr(experiment, path.parent), name=f"{name}_best",
                                   overrides="".join(f"    {k!r}: {v!r},\n" for k, v in values.items())))

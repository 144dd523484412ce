"""`meshforge sweep`: an Optuna study of tiny runs that prunes, survives kill -9, shares its study between workers,
writes the best trial as an experiment file, and refuses bad input in one line."""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")  # the lab extra (the newest-stack CI installs only test-core)
from optuna.trial import TrialState  # noqa: E402

from helpers import REPO, meshforge, start_meshforge, tree_digest  # noqa: E402
from lab.sweep_study import OWNER, RETRY_OF, UNCOUNTED, HEARTBEAT, counted, requeue_stale  # noqa: E402

TINY = {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "train.seq_len": 16, "train.batch_size": 4,
        "train.steps": 12, "train.eval_every": 4, "train.eval_batches": 2, "train.checkpoint_every": 4,
        "train.log_every": 4, "log.progress": "lines", "log.tensorboard": False}
EXPERIMENT = f'''"""A tiny character model for sweep tests."""
import dataclasses

from train.config import apply_overrides, load_experiment


def get_config():
    cfg = apply_overrides(load_experiment({str(REPO / "experiments" / "shakespeare_char.py")!r}), {TINY!r})
    return dataclasses.replace(cfg, name="tiny")
'''
# Few distinct points: trials that repeat one find its train step in the compilation cache (a new learning rate
# is a new program to compile, most of a tiny trial's time).
SPACE = '''def space(trial):
    return {"optim.lr": trial.suggest_categorical("optim.lr", [1e-5, 1e-3, 3e-3, 3e-2]),
            "optim.warmup_steps": trial.suggest_int("optim.warmup_steps", 0, 4, step=4)}
'''


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tiny.py").write_text(EXPERIMENT)
    (tmp_path / "space.py").write_text(SPACE)
    return tmp_path


def _sweep_args(tmp_path, *extra):
    return ["sweep", tmp_path / "tiny.py", "--space", tmp_path / "space.py", "--workdir", tmp_path / "sweep", *extra]


def _study(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{path / 'study.db'}")


def _finished(study: optuna.Study) -> list:
    return [t for t in study.get_trials() if counted(t) and t.state.is_finished()]


def _wait_for(condition, proc, what: str, timeout: float = 300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.stderr.read()[-3000:]}")
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _two_done_and_one_mid_run(sweep_dir: Path) -> bool:
    """From the files alone (cheap enough to look often: a tiny trial is past its first checkpoint for only a
    second): two trials wrote summary.json, and one without it has a committed checkpoint."""
    from train.checkpoint import latest_committed_step

    trials = list(sweep_dir.glob("trial_*"))
    done = [t for t in trials if (t / "summary.json").exists()]
    return len(done) >= 2 and any(latest_committed_step(t / "checkpoints") for t in trials if t not in done)


def test_sweep_prunes_survives_kill_and_writes_the_best(files):
    """Acceptance, tiny: 8 trials over lr and warmup; kill -9 once a trial is running past a checkpoint with two
    finished; the same command again finishes the sweep: exactly 8 counted trials, at least one pruned, the
    finished ones untouched, the killed one resumed from its checkpoint; the study opens in plain Optuna, and
    best_experiment.py reproduces the best trial.

    The first four trials are queued into the study beforehand (as a user may: Optuna's enqueue_trial): three that
    learn, then one whose learning rate is too small to move the loss in 12 steps, which the median pruner stops
    whatever the sampler draws later. The other four come from TPE."""
    sweep_dir = files / "sweep"
    sweep_dir.mkdir()
    queued = optuna.create_study(storage=f"sqlite:///{sweep_dir / 'study.db'}", study_name="tiny")
    for lr, warmup in ((3e-2, 0), (3e-3, 4), (1e-3, 0), (1e-5, 0)):
        queued.enqueue_trial({"optim.lr": lr, "optim.warmup_steps": warmup})
    args = _sweep_args(files, "--trials", 8, "--seed", 0, "--prune-startup", 2)
    proc = start_meshforge(*args)
    try:
        _wait_for(lambda: _two_done_and_one_mid_run(sweep_dir), proc,
                  "two finished trials and a running one with a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.state, t.value) for t in _finished(_study(sweep_dir))}
    [killed] = _study(sweep_dir).get_trials(states=(TrialState.RUNNING,))
    untouched = {n: tree_digest(sweep_dir / f"trial_{n}") for n in before}

    r = meshforge(*args)
    assert r.returncode == 0, r.stderr
    study = _study(sweep_dir)
    done = _finished(study)
    assert len(done) == 8 and study.trials[3].state == TrialState.PRUNED, [t.state for t in done]
    assert {t.number: (t.state, t.value) for t in done if t.number in before} == before
    assert {n: tree_digest(sweep_dir / f"trial_{n}") for n in before} == untouched  # not run again
    # The killed trial is set aside (uncounted) and ran again under a new number in its own workdir, from its
    # checkpoint
    stale = study.trials[killed.number]
    assert stale.state == TrialState.FAIL and stale.system_attrs[UNCOUNTED]
    [retry] = [t for t in study.trials if t.system_attrs.get(RETRY_OF) == killed.number]
    assert retry.params == killed.params and retry.user_attrs["workdir"] == killed.user_attrs["workdir"]
    assert retry.state.is_finished() and counted(retry)
    assert f"trial {killed.number}'s worker died" in r.stdout and "resuming at step" in r.stderr
    assert len(study.trials) == 9
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 8 - len(before), r.stdout
    assert f"trial {retry.number} (trial {killed.number} resumed) |" in r.stdout

    records = json.loads((sweep_dir / "trials.json").read_text())["trials"]
    assert [t["number"] for t in records] == list(range(9))
    assert sum(t["counted"] and t["state"] in ("COMPLETE", "PRUNED", "FAIL") for t in records) == 8
    best = study.best_trial
    from train.config import load_experiment

    cfg = load_experiment(str(sweep_dir / "best_experiment.py"))
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.model.d_model, cfg.name) == \
        (best.params["optim.lr"], best.params["optim.warmup_steps"], 32, "tiny_best")
    assert f"trial {best.number}" in (sweep_dir / "best_experiment.py").read_text()

    # meshforge report of the sweep folder: its plots, of the stated size, linked from the Markdown
    pytest.importorskip("matplotlib")
    from PIL import Image

    from lab.report import DPI, FIGSIZE

    r = meshforge("report", sweep_dir, "--out", files / "report")
    assert r.returncode == 0, r.stderr
    md = (files / "report" / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert images == ["sweep_sweep_trials.png", "sweep_sweep_importance.png"], md
    for name in images:
        with Image.open(files / "report" / name) as im:
            assert im.format == "PNG" and im.size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    assert "1 requeued" in md and f"Best: trial {best.number}" in md


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_share_one_study(files, storage):
    """Two sweep processes started at once on one journal file or one new SQLite database: 3 counted trials in
    all, each run once, by both workers."""
    url = f"journal:{files / 'study.log'}" if storage == "journal" else f"sqlite:///{files / 'study.db'}"
    args = _sweep_args(files, "--trials", 3, "--storage", url, "--pruner", "none")
    procs = [start_meshforge(*args) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(files / "study.log")))
                              if storage == "journal" else url)
    assert len(_finished(study)) == 3 and all(counted(t) for t in study.trials)
    workdirs = [t.user_attrs["workdir"] for t in study.trials]
    assert len(set(workdirs)) == len(workdirs) == 3
    for w in workdirs:  # one run each: a second run in the same workdir would have resumed, or refused the lock
        assert json.loads((Path(w) / "summary.json").read_text())["steps_this_run"] == 12
    assert len({t.system_attrs[OWNER]["pid"] for t in study.trials}) == 2  # both workers ran trials
    printed = [ln.split(" |")[0] for out, _ in outs for ln in out.splitlines() if ln.startswith("trial ")]
    assert sorted(printed) == [f"trial {n}" for n in range(3)]


@pytest.mark.parametrize("case", ["unknown key", "unreachable sqlite", "postgres"])
def test_bad_input_is_one_line_and_creates_nothing(files, case):
    if case == "unknown key":
        (files / "space.py").write_text(SPACE.replace('"optim.lr"', '"optim.lrr"', 1))
    storage = {"unreachable sqlite": ["--storage", "sqlite:////nonexistent/dir/x.db"],
               "postgres": ["--storage", "postgresql://sweeper:secret@nohost.invalid:1/x"]}.get(case, [])
    r = meshforge(*_sweep_args(files, "--trials", 2, *storage), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshforge: error: "), r.stderr
    want = {"unknown key": "space.py: optim.lrr: unknown config key; did you mean 'optim.lr'?",
            "unreachable sqlite": "--storage sqlite:////nonexistent/dir/x.db: cannot open the study storage",
            "postgres": "--storage postgresql://sweeper:***@nohost.invalid:1/x"}[case]
    assert want in lines[0] and "secret" not in lines[0], lines[0]
    assert not (files / "sweep").exists()


def test_failed_trials_keep_their_error_and_the_sweep_goes_on(files):
    """Values a config section refuses fail their trial only, with the one-line error in the study; a run error
    that every first trial hits (here a missing data file) stops the sweep instead of burning the study on it."""
    (files / "space.py").write_text("def space(trial):\n"
                                    "    return {'model.n_heads': trial.suggest_categorical('heads', [3, 5])}\n")
    r = meshforge(*_sweep_args(files, "--trials", 4), timeout=300)
    assert r.returncode == 0, r.stderr
    study = _study(files / "sweep")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 4
    assert all(t.user_attrs["error"].startswith("model.d_model (32) must be divisible by model.n_heads")
               for t in study.trials)
    assert len([ln for ln in r.stdout.splitlines() if "| failed: model.d_model (32) must be divisible" in ln]) == 4
    assert "none completed, so there is no best trial yet" in r.stdout

    # One study per sweep folder, and one search per study: both refused before any trial runs.
    r = meshforge(*_sweep_args(files, "--trials", 8, "--study", "other"))
    assert r.returncode == 2 and "holds the trials of study 'tiny', not 'other'" in r.stderr, r.stderr
    r = meshforge(*_sweep_args(files, "--trials", 8, "--train.steps", "8"))
    assert r.returncode == 2 and "the study was started with overrides" in r.stderr, r.stderr
    assert len(_study(files / "sweep").trials) == 4

    (files / "space.py").write_text(SPACE)
    r = meshforge("sweep", files / "tiny.py", "--space", files / "space.py", "--workdir", files / "broken",
                  "--trials", 8, "--study", "broken", "--data.path", files / "missing.txt", timeout=300)
    assert r.returncode == 2 and "the first 3 trials all failed with the same error" in r.stderr.splitlines()[-1]
    assert "data.path: file not found" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("space,error", [
    ("def space(trial):\n    return {'optim.lr': trial.suggest_categorical('lr', ['fast', 'slow'])}\n",
     "space.py: optim.lr: expects a number, got '"),
    ("def spaces(trial):\n    return {}\n", "space.py: it must define space(trial)"),
    ("def space(trial):\n    return [1]\n", "space(trial) must return a dict of config keys to values"),
    ("def space(trial):\n    return {'optim.lr': 1 / 0}\n", "space(trial) raised ZeroDivisionError at line 2"),
    ("def space(trial)\n", "space.py: SyntaxError at line 1"),
    ("def space(trial):\n    return {'train.steps': trial.suggest_int('s', 1, 9)}\n",
     "train.steps is searched and also fixed on the command line (--train.steps)"),
])
def test_space_mistakes_are_user_errors(tmp_path, space, error):
    """Checked before any storage or device: in-process, with the experiment's config."""
    from lab.sweep import check_space, load_space
    from parallel.errors import UserError
    from train.config import load_experiment

    (tmp_path / "space.py").write_text(space)
    base = load_experiment(str(REPO / "experiments" / "shakespeare_char.py"))
    with pytest.raises(UserError) as e:
        check_space(load_space(str(tmp_path / "space.py")), tmp_path / "space.py", base, {"train.steps": "5"})
    assert error in str(e.value) and "\n" not in str(e.value)


def test_a_trial_asked_past_the_last_slot_is_dropped_uncounted(tmp_path):
    """Two workers that ask at the same moment for the last of N trials: the later-numbered one is not the
    sweep's; it is failed uncounted and its worker stops."""
    import types

    from lab.sweep import Driver

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    study.ask()  # a peer's trial, running
    driver = Driver(types.SimpleNamespace(trials=1), study)
    assert driver._claim() is None
    late = study.trials[1]
    assert late.state == TrialState.FAIL and not counted(late) and late.user_attrs["error"].startswith("surplus")
    assert study.trials[0].state == TrialState.RUNNING


def _study_with_running_trial(tmp_path, owner: dict, heartbeat: float) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    trial = study.ask()
    trial.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
    trial.set_user_attr("workdir", "/w/trial_0")
    trial.report(4.0, 4)
    tid = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.number)
    study._storage.set_trial_system_attr(tid, OWNER, owner)
    study._storage.set_trial_system_attr(tid, HEARTBEAT, heartbeat)
    return study


@pytest.mark.parametrize("who,age,stale", [
    ("dead here", 0, True), ("alive here", 1000, False), ("elsewhere", 10, False), ("elsewhere", 1000, True)])
def test_stale_trials_are_requeued_once(tmp_path, who, age, stale):
    """A trial whose worker is gone (dead PID on this machine, or no heartbeat from another for --stale-after
    seconds) goes back to the queue once, with its values, workdir and evaluations; a live one is left alone."""
    from lab.sweep_study import machine, owner, process_start

    me = owner()
    dead = {**me, "pid": 2 ** 22 + 1, "start": 1}  # above the kernel's PID limit: never a live process
    other = {"machine": "another-boot/1", "pid": os.getpid(), "start": process_start(os.getpid())}
    study = _study_with_running_trial(tmp_path, {"dead here": dead, "alive here": me, "elsewhere": other}[who],
                                      time.time() - age)
    assert machine() is not None
    assert requeue_stale(study, stale_after=120) == ([0] if stale else [])
    assert requeue_stale(study, stale_after=120) == []  # a second look (or a second worker) finds nothing
    first = study.trials[0]
    if not stale:
        assert first.state == TrialState.RUNNING and len(study.trials) == 1
        return
    assert first.state == TrialState.FAIL and not counted(first)
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.system_attrs[RETRY_OF] == 0
    assert retry.params == first.params and retry.user_attrs == {"workdir": "/w/trial_0"}
    assert retry.intermediate_values == {4: 4.0}


@pytest.mark.slow  # ~70 s here: two processes compile each trial and run it over gloo
def test_two_process_sweep_talks_to_the_study_from_process_0(files):
    """jax.distributed: both processes run every trial (each writes its checkpoint shards); process 0 alone asks,
    reports, prunes and tells, and its prune decisions end the run on both."""
    import subprocess
    import sys

    from helpers import cli_env, free_port

    port = free_port()
    args = [*map(str, _sweep_args(files, "--trials", 3, "--seed", 0, "--prune-startup", 1)),
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", *args, "--process-id", str(i)], env=cli_env(1),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert len([ln for ln in outs[0][0].splitlines() if ln.startswith("trial ")]) == 3
    assert not [ln for ln in outs[1][0].splitlines() if ln.startswith(("trial ", "sweep:"))]
    study = _study(files / "sweep")
    assert len(_finished(study)) == 3 and {t.system_attrs[OWNER]["pid"] for t in study.trials} == {procs[0].pid}
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            state = Path(t.user_attrs["workdir"]) / "checkpoints" / "12" / "state"
            assert {p.name for p in state.iterdir() if p.name.startswith("ocdbt")} == {"ocdbt.process_0",
                                                                                       "ocdbt.process_1"}

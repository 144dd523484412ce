"""`meshforge report` (lab/report.py): PNGs of the stated size and a Markdown page linking them, for a
shakespeare run (also logged to Weights & Biases offline) and for a sweep's trials."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")  # the lab extra: optuna, matplotlib (with PIL), wandb
pytest.importorskip("matplotlib")
pytest.importorskip("wandb")
from PIL import Image  # noqa: E402

from helpers import meshforge  # noqa: E402
from lab.report import DPI, FIGSIZE  # noqa: E402

SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def linked_images(md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md.read_text())


def assert_images(out: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(out / name) as im:
            im.verify()  # a complete, valid PNG
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == SIZE, (name, im.size)


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (LevelDB-log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    rows, pos, buf = [], 7, b""  # after the file header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_report_of_a_shakespeare_run_and_its_wandb_log(tmp_path):
    wd = tmp_path / "run"
    r = meshforge("train", "experiments/shakespeare_char.py", "--workdir", str(wd), "--model.n_layers", "1",
                  "--model.d_model", "32", "--model.n_heads", "2", "--train.batch_size", "4", "--train.seq_len", "16",
                  "--train.steps", "12", "--train.log_every", "4", "--train.eval_every", "4", "--train.eval_batches",
                  "1", "--log.tensorboard", "false", "--log.wandb_project", "meshforge-test")
    assert r.returncode == 0, r.stderr
    rows = wandb_history(wd)
    logged: dict[int, dict] = {}  # a step's train row and its evaluation row, merged as W&B merges them
    for line in (wd / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        logged.setdefault(row["step"], {}).update(row)
    assert [row["_step"] for row in rows if "loss" in row] == [4, 8, 12]
    compared = 0
    for row in rows:
        for key in ("loss", "val_loss", "energy_kwh"):
            if key in row:
                assert row[key] == pytest.approx(logged[row["_step"]][key], rel=1e-12)
                compared += 1
    assert compared == 9  # each of the three at steps 4, 8 and 12

    r = meshforge("report", str(wd))
    assert r.returncode == 0, r.stderr
    out = wd / "report"
    images = linked_images(out / "report.md")
    assert set(images) == {"loss.png", "lr.png", "throughput.png", "energy.png", "grad_norms.png"}
    assert_images(out, images)
    md = (out / "report.md").read_text()
    assert "| run | steps |" in md and "modelled" in md  # the runs' table names the energy method

    r = meshforge("report", str(wd), "--out", str(wd))  # never into a run's own folder
    assert r.returncode == 2 and "run's or a sweep's own folder" in r.stderr
    r = meshforge("report", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "neither a run" in r.stderr


def test_report_of_a_sweep_shows_trials_and_importances(tmp_path):
    from lab.sweep_study import write_trials

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):  # the loss depends on lr much more than on warmup: importances must say so
        lr = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        warmup = trial.suggest_int("optim.warmup_steps", 0, 50)
        for step in (10, 20):
            value = (1 + abs(lr - 3e-3) * 100) * (1 + 0.001 * warmup) * (2 - step / 20)
            trial.report(value, step)
            if trial.number % 4 == 3:
                raise optuna.TrialPruned()
        return value

    study.optimize(objective, n_trials=12)
    write_trials(study, sweep / "trials.json")
    r = meshforge("report", str(sweep), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    images = linked_images(out / "report.md")
    assert images == ["sweep_sweep_trials.png", "sweep_sweep_importance.png"]
    assert_images(out, images)
    md = (out / "report.md").read_text()
    assert "9 complete, 3 pruned" in md
    importances = dict(re.findall(r"`(optim\.\w+)` ([0-9]+\.[0-9]+)", md.split("Importances:")[1].splitlines()[0]))
    assert float(importances["optim.lr"]) > float(importances["optim.warmup_steps"])
    assert md.count("| pruned |") == 3

"""`meshforge report RUN [RUN ...]`: PNG plots and a Markdown summary of runs and sweeps.

A run is a workdir (metrics.jsonl, summary.json); a sweep is a `meshforge sweep` folder (trials.json, one workdir
per trial). Runs are drawn over each other, one colour each: loss and validation loss, learning rate, throughput
and MFU, gradient norms (per layer when the run logged diagnostics), energy and CO2e. A sweep adds its trials'
objective with the best so far, each trial's validation curve (pruned trials end early), and the parameters'
importances (Optuna's fANOVA over the finished trials). Every PNG is FIGSIZE at DPI: 1000 x 500 pixels.
"""
from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

from parallel.errors import UserError

FIGSIZE, DPI = (10.0, 5.0), 100  # 1000 x 500 pixels
LAYER_KEY = re.compile(r"diag/grad_norm/layer_(\d+)$")


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.rows = read_rows(path / "metrics.jsonl")
        summary = path / "summary.json"
        self.summary = json.loads(summary.read_text()) if summary.is_file() else {}
        self.name = self.summary.get("name") or path.name
        self.label = path.name if path.name != self.name else self.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    def has(self, key: str) -> bool:
        return any(isinstance(r.get(key), (int, float)) for r in self.rows)


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a kill
    return rows


def classify(paths: list[Path]) -> tuple[list[Run], list[Path]]:
    runs, sweeps = [], []
    for p in paths:
        if (p / "trials.json").is_file():
            sweeps.append(p)
        elif (p / "metrics.jsonl").is_file():
            runs.append(Run(p))
        else:
            raise UserError(f"{p}: neither a run (no metrics.jsonl) nor a sweep (no trials.json); give a run's "
                            "--workdir or a sweep's folder")
    return runs, sweeps


def output_dir(paths: list[Path], out: Path | None) -> Path:
    out = out or (paths[0] / "report" if len(paths) == 1 else Path("report"))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if any((out / name).exists() for name in ("metrics.jsonl", "checkpoints", "trials.json")):
        raise UserError(f"--out {out}: that is a run's or a sweep's own folder; give a new folder (e.g. {out}/report)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def report(paths: list[Path], out: Path | None = None) -> Path:
    """Write the plots and report.md; return the report's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    runs, sweeps = classify(paths)
    out = output_dir(paths, out)
    sections = []
    if runs:
        sections.append(run_section(runs, out))
    for sweep in sweeps:
        sections.append(sweep_section(sweep, out))
    md = out / "report.md"
    md.write_text("# meshforge report\n\n" + "\n\n".join(sections) + "\n")
    print(f"meshforge: report: {md} ({len(list(out.glob('*.png')))} plots)")
    return md


# ----------------------------------------------------------------------------------------------------- runs

RUN_PLOTS = (  # file, title, [(panel title, metric keys, log scale)]
    ("loss.png", "Loss", [("training and validation loss", ("loss", "val_loss"), False)]),
    ("lr.png", "Learning rate", [("learning rate", ("lr",), False)]),
    ("throughput.png", "Throughput", [("tokens/s", ("tokens_per_s",), False), ("MFU", ("mfu",), False)]),
    ("energy.png", "Energy and emissions (run totals)", [("energy, kWh", ("energy_kwh",), False),
                                                         ("CO2e, kg", ("co2e_kg",), False)]),
)


def run_section(runs: list[Run], out: Path) -> str:
    import matplotlib.pyplot as plt

    images = []
    for file, title, panels in RUN_PLOTS:
        panels = [p for p in panels if any(r.has(k) for r in runs for k in p[1])]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=FIGSIZE, dpi=DPI, squeeze=False)
        for ax, (panel, keys, log) in zip(axes[0], panels):
            for i, run in enumerate(runs):
                for key in keys:
                    steps, values = run.series(key)
                    if steps:
                        val = key.startswith("val")
                        ax.plot(steps, values, color=f"C{i}", linestyle="--" if val else "-",
                                marker="o" if val else None, markersize=3, label=f"{run.label} {key}")
            style(ax, panel, log)
        save(fig, title, out / file)
        images.append((title, file))
    images += grad_norm_plots(runs, out)
    return "## Runs\n\n" + run_table(runs) + "\n\n" + "\n\n".join(f"![{t}]({f})" for t, f in images)


def grad_norm_plots(runs: list[Run], out: Path) -> list[tuple[str, str]]:
    """The global gradient norm of every run, and per layer for each run that logged diagnostics."""
    import matplotlib.pyplot as plt

    images = []
    with_layers = [r for r in runs if any(LAYER_KEY.match(k) for row in r.rows for k in row)]
    if any(r.has("grad_norm") for r in runs):
        panels = 1 + bool(with_layers)
        fig, axes = plt.subplots(1, panels, figsize=FIGSIZE, dpi=DPI, squeeze=False)
        for i, run in enumerate(runs):
            axes[0][0].plot(*run.series("grad_norm"), color=f"C{i}", label=run.label)
        style(axes[0][0], "gradient norm (before clipping)", True)
        if with_layers:
            run = with_layers[0]
            layers = sorted({int(m.group(1)) for row in run.rows for k in row if (m := LAYER_KEY.match(k))})
            cmap = plt.get_cmap("viridis", max(len(layers), 2))
            for j, layer in enumerate(layers):
                axes[0][1].plot(*run.series(f"diag/grad_norm/layer_{layer}"), color=cmap(j), label=f"layer {layer}")
            style(axes[0][1], f"per layer: {run.label}", True)
        save(fig, "Gradient norms", out / "grad_norms.png")
        images.append(("Gradient norms", "grad_norms.png"))
    return images


def run_table(runs: list[Run]) -> str:
    cols = [("run", lambda r: f"`{r.path}`"), ("steps", lambda r: r.summary.get("last_step")),
            ("final loss", lambda r: r.summary.get("final_loss")),
            ("val loss", lambda r: r.summary.get("final_val_loss")),
            ("tokens/s", lambda r: r.summary.get("tokens_per_s")), ("MFU", lambda r: r.summary.get("mfu")),
            ("chip-hours", lambda r: r.summary.get("chip_hours")),
            ("energy kWh", lambda r: r.summary.get("energy_kwh")), ("CO2e kg", lambda r: r.summary.get("co2e_kg")),
            ("cost $", lambda r: r.summary.get("cost_usd"))]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(f(r)) for _, f in cols) + " |" for r in runs]
    methods = sorted({f"{r.summary[k]}" for r in runs for k in ("energy_method_cpu", "energy_method_accelerators")
                      if r.summary.get(k)})
    unfinished = [r.label for r in runs if not r.summary]
    notes = [f"Energy: {'; '.join(methods)}."] if methods else []
    if unfinished:
        notes.append(f"No summary.json yet (running or stopped early): {', '.join(unfinished)}.")
    return "\n".join(lines) + ("\n\n" + " ".join(notes) if notes else "")


def cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------- sweeps

def sweep_section(path: Path, out: Path) -> str:
    import matplotlib.pyplot as plt

    data = json.loads((path / "trials.json").read_text())
    trials = sorted(data["trials"], key=lambda t: t["number"])
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name)
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]

    fig, (ax, curves) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    if done:
        ax.scatter([t["number"] for t in done], [t["value"] for t in done], color="C0", label="complete")
        best, running = [], math.inf
        for t in trials:
            if t in done:
                running = min(running, t["value"])
            best.append(running if math.isfinite(running) else None)
        ax.step([t["number"] for t in trials], best, where="post", color="C3", label="best so far")
    pruned = [t for t in trials if t["state"] == "PRUNED" and t["intermediate"]]
    if pruned:
        ax.scatter([t["number"] for t in pruned], [last_value(t) for t in pruned], marker="x", color="C1",
                   label="pruned (last reported)")
    style(ax, f"{data.get('metric', 'objective')} per trial", False)
    ax.set_xlabel("trial")
    colours = {"COMPLETE": "C0", "PRUNED": "C1"}
    for t in trials:
        if t["intermediate"]:
            steps = sorted(t["intermediate"], key=int)
            curves.plot([int(s) for s in steps], [t["intermediate"][s] for s in steps], marker="o", markersize=3,
                        color=colours.get(t["state"], "grey"), alpha=0.7)
    style(curves, "validation loss of each trial (orange: pruned, grey: failed)", False, legend=False)
    trials_png = f"sweep_{tag}_trials.png"
    save(fig, f"Sweep {data.get('study', path.name)}", out / trials_png)
    images = [("Trials", trials_png)]

    importances = param_importances(trials)
    if importances:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="C0")
        ax.set_xlabel("importance (fANOVA)")
        save(fig, "Parameter importances", out / f"sweep_{tag}_importance.png")
        images.append(("Parameter importances", f"sweep_{tag}_importance.png"))

    for t in trials:  # a trial whose worker died was queued again under a new number: not a result
        t["shown"] = "requeued" if t.get("counted") is False and t["state"] == "FAIL" else t["state"].lower()
    counts = collections.Counter(t["shown"] for t in trials)
    best = min(done, key=lambda t: t["value"]) if done else None
    lines = [f"## Sweep `{data.get('study', path.name)}` ({path})", "",
             ", ".join(f"{counts[s]} {s}" for s in ("complete", "pruned", "fail", "requeued", "running", "waiting")
                       if counts[s]) + "."]
    if best:
        lines.append(f"Best: trial {best['number']}, {data.get('metric', 'value')} {best['value']:.5g}, "
                     + ", ".join(f"`{k}` = {cell(v)}" for k, v in best["params"].items()) + ".")
    if importances:
        lines.append("Importances: " + ", ".join(f"`{k}` {v:.2f}" for k, v in importances.items()) + ".")
    keys = sorted({k for t in trials for k in t["params"]})
    lines += ["", "| trial | state | value | " + " | ".join(keys) + " | note |", "|" + "---|" * (len(keys) + 4)]
    for t in trials:
        note = t.get("error") or (f"pruned at step {t['pruned_at']}" if t.get("pruned_at") else "")
        lines.append(f"| {t['number']} | {t['shown']} | {cell(t['value'])} | "
                     + " | ".join(cell(t["params"].get(k)) for k in keys) + f" | {note} |")
    return "\n".join(lines) + "\n\n" + "\n\n".join(f"![{t}]({f})" for t, f in images)


def last_value(trial: dict) -> float:
    return trial["intermediate"][max(trial["intermediate"], key=int)]


def param_importances(trials: list[dict]) -> dict[str, float]:
    """fANOVA importances over the completed trials (optuna), with each parameter's range taken from the trials
    themselves: trials.json holds values, not the search space. Empty with fewer than two distinct results."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None and t["params"]]
    if len(done) < 2 or len({t["value"] for t in done}) < 2:
        return {}
    names = sorted({k for t in done for k in t["params"]})
    dists = {}
    for k in names:
        values = [t["params"][k] for t in done if k in t["params"]]
        if all(isinstance(v, bool) or isinstance(v, str) for v in values) or len(set(values)) < 2:
            dists[k] = CategoricalDistribution(sorted(set(values), key=str))
        elif all(isinstance(v, int) for v in values):
            dists[k] = IntDistribution(min(values), max(values))
        else:
            lo, hi = float(min(values)), float(max(values))
            dists[k] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 10)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for t in done:
        if set(t["params"]) == set(names):
            study.add_trial(optuna.trial.create_trial(params=t["params"], distributions=dists, value=t["value"]))
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return {}  # too few usable trials for the evaluator


# ----------------------------------------------------------------------------------------------------- style

def style(ax, title: str, log: bool, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=1 + len(ax.get_legend_handles_labels()[0]) // 8)


def save(fig, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": every image keeps the stated size
    import matplotlib.pyplot as plt

    plt.close(fig)

"""Where a run's numbers go: metrics.jsonl, TensorBoard events, and a progress display.

Only process 0 writes. The display is a rich progress bar on a terminal and plain lines elsewhere (CI, logs).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, workdir: Path, *, enabled: bool, tensorboard: bool, wandb: dict | None = None):
        """wandb: wandb.init's project, mode, name and config, to send every row to Weights & Biases too."""
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self.progress: Progress | None = None
        if enabled and tensorboard:
            self.tb = summary_writer_class()(str(workdir / "tb"), flush_secs=30)
        if enabled and wandb:
            self.wandb = wandb_run(workdir, **wandb)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run logged past the checkpoint we continue from."""
        if not (self.enabled and self.path.exists()):
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def last_values(self, keys: tuple[str, ...]) -> dict | None:
        """The last row's values of `keys` (a row that has the first of them), before truncate_after drops it."""
        if not (self.enabled and self.path.exists()):
            return None
        for ln in reversed(self.path.read_text().splitlines()):
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if keys[0] in row:
                return {k: row.get(k) for k in keys}
        return None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: json_value(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=int(step))

    def show_progress(self, total: int, start: int, mode: str, enabled: bool) -> "Progress":
        """The run's progress display, closed with the writer (also when the run ends with an exception)."""
        self.progress = Progress(total, start, mode, enabled)
        return self.progress

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish()
        if self.tb is not None:
            tb, self.tb = self.tb, None
            try:
                tb.close()
            except OSError:
                pass  # the disk filled up: the failure is reported once, by the loop


def wandb_run(workdir: Path, *, project: str, mode: str, name: str, config: dict):
    """A W&B run kept in WORKDIR/wandb/, with one id per workdir so that a resumed run continues the same W&B run."""
    import secrets

    import wandb

    id_file = workdir / "wandb_id.txt"
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(4))
    return wandb.init(project=project, mode=mode, name=name, config=config, dir=str(workdir),
                      id=id_file.read_text().strip(), resume="allow", settings=wandb.Settings(silent=True))


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX imports torch whenever it is installed
    (only to accept torch tensors, which a run never logs): ~2 s of every run's start-up where the bench or test
    extras are installed. A None entry in sys.modules makes that optional import fail as if torch were absent."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def json_value(v):
    """A plain Python value for JSON: arrays' scalars unwrapped, NaN/inf as None."""
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float):
        return v if math.isfinite(v) else None  # full precision: resumed runs are compared exactly; no NaN in JSON
    return v


def fmt_duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A live bar (steps, loss, tokens/s, ETA) on a TTY; one plain line per logged step otherwise."""

    def __init__(self, total: int, start: int, mode: str, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        tty = sys.stderr.isatty()
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="compiling")
            self.bar.start()

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        info = " | ".join(_fmt(k, metrics[k]) for k in ("loss", "val_loss", "sparsity", "tokens_per_s", "step_ms",
                                                        "mfu") if k in metrics)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.mode == "lines":
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total} | {info} | eta {fmt_duration(eta)}", file=sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None  # later lines print plainly


def _fmt(k: str, v) -> str:
    if k == "tokens_per_s":
        return f"{v / 1000:.1f}k tok/s"
    if k == "step_ms":
        return f"{v:.1f} ms/step"
    if k in ("mfu", "sparsity"):
        return f"{k} {100 * v:.1f}%"
    return f"{k} {v:.4f}"

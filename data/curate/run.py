"""Running a curation: checks, the output folder, the jobs in order, progress lines, resumption.

`curate(cfg, overwrite=False) -> dict` is the entry point (the CLI's `meshforge curate`, benchmarks and experiment
helpers call it); it returns what DIR/stats.json holds. Before anything is written it checks the spec, the input
and the executor. The output folder must be new or empty, or hold an unfinished curation of the same spec and
input (its fingerprint, DIR/work/spec.json: the input files' sizes and modification times, the stages and their
settings, tasks, output format; not the executor or the number of workers, which do not change results): then the
curation continues, and datatrove's completion markers (DIR/work/logs/<job>/completions/) skip every task that
finished before. Anything else (a finished curation, another spec's, a DIR/work/spec.json that is not a curation's,
other files) is refused in one line unless `overwrite`. `overwrite` empties the folder first, whatever it holds, an
unfinished curation of the same spec too: the curation starts clean, nothing is resumed (it never removes the
folder itself, nor empties a folder that is /, the home folder, the current folder or one above them, or holds
the input).

Progress: one line per stage on stderr (documents in and out, seconds); datatrove's own logging and bars go to
DIR/work/logs/curate.log and its per-task logs.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

from data.curate.spec import (STAGES, CurateConfig, apply_overrides, bands_rows, catch_probability, check_extra,
                               load_spec, lsh_threshold, validate)
from parallel.errors import UserError

INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class CurationFailed(Exception):
    """A stage's task raised; the message names the stage, the error and where its logs are (exit code 1)."""


# --- input --------------------------------------------------------------------------------------------------------

def input_files(path: str) -> tuple[list[Path], Path]:
    """The JSONL files an input path names (sorted), and the folder ids are made relative to."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(INPUT_SUFFIXES))
        root, where = p, f"folder {path}"
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        root = Path(os.path.commonpath([f.parent for f in files])) if files else p.parent
        where = f"pattern {path}"
    elif p.is_file():
        files, root, where = [p], p.parent, path
    else:
        raise UserError(f"input.path: not found: {path}; give a JSONL file, a folder of them or a glob")
    if not files:
        raise UserError(f"input.path: {where} has no {', '.join(INPUT_SUFFIXES)} files")
    bad = [f for f in files if not f.name.endswith(INPUT_SUFFIXES)]
    if bad:
        raise UserError(f"input.path: {bad[0]} is not JSONL; use {', '.join(INPUT_SUFFIXES)} files")
    return [f.resolve() for f in files], root.resolve()


def check_first_record(file: Path, text_field: str) -> None:
    """Refuse at once an input whose first record is not a JSON object with the text field."""
    import gzip

    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8", errors="replace") as f:
        line = next((ln for ln in f if ln.strip()), "")
    if not line:
        return  # empty files are fine; the input stage counts what it reads
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"input.path: {file} is not JSONL (its first line is not JSON)") from None
    if not isinstance(record, dict):
        raise UserError(f"input.path: {file} is not JSONL of objects (its first line is a {type(record).__name__})")
    if text_field not in record:
        raise UserError(f"input.text_field: {text_field!r} is not in the first record of {file} (it has "
                        f"{', '.join(record) or 'no fields'}); set --input.text_field")


def _stat(f: Path) -> list:
    st = f.stat()
    return [str(f), st.st_size, st.st_mtime_ns]


def fingerprint(cfg: CurateConfig, files: list[Path], evals: list[Path]) -> dict:
    """What the curation's results depend on (not the executor, the workers or where the output goes)."""
    fp = {"input": {"files": [_stat(f) for f in files], "text_field": cfg.input.text_field,
                    "id_field": cfg.input.id_field},
          "output": {"format": cfg.output.format}, "run": {"tasks": cfg.run.tasks}, "stages": list(cfg.stages)}
    for stage in cfg.stages:
        fp[STAGES[stage]] = dataclasses.asdict(getattr(cfg, STAGES[stage]))
    if evals:
        fp["decontaminate"]["eval_files"] = [_stat(f) for f in evals]
    return json.loads(json.dumps(fp))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- the output folder ----------------------------------------------------------------------------------------------

def _dangerous(folder: Path) -> str | None:
    if folder == Path(folder.anchor):
        return "the file system's root"
    for name, place in (("your home folder", Path.home().resolve()), ("the current folder", Path.cwd().resolve())):
        if folder == place or folder in place.parents:
            return name if folder == place else f"a folder above {name}"
    return None


def _clear(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_symlink() or not child.is_dir():
            child.unlink()
        else:
            shutil.rmtree(child)


def _saved_fingerprint(saved_path: Path, path: str) -> dict | None:
    """The fingerprint an earlier curation left in DIR/work/spec.json (None when there is none); a file there that
    is not one (truncated, foreign) is refused in one line, as a folder holding something else."""
    if not saved_path.is_file():
        return None
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    fp = saved.get("fingerprint") if isinstance(saved, dict) else None
    if not isinstance(fp, dict):
        raise UserError(f"output.path: {path} is not empty and its work/spec.json is not a curation's (unreadable "
                        "or foreign); pass --overwrite to replace its contents, or choose another --output")
    return fp


def prepare_output(path: str, fp: dict, overwrite: bool, inputs: list[Path]) -> tuple[Path, bool]:
    """The output folder, ready: (folder, resuming). Refuses what is not a new, empty or unfinished same-spec one."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output.path: {path} is a file; give a folder")
    for f in inputs:
        if out == f or out in f.parents:
            raise UserError(f"output.path: {path} holds the input {f}; choose an output folder outside the input")
        if f.is_dir() and f in out.parents:
            raise UserError(f"output.path: {path} is inside the input folder {f}; choose an output folder outside it")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:  # start clean, whatever the folder holds (a finished or unfinished curation too)
            danger = _dangerous(out)
            if danger:
                raise UserError(f"output.path: refusing to empty {path}: it is {danger}; give --output a folder of "
                                "its own")
            _clear(out)
        else:
            saved = _saved_fingerprint(out / "work" / "spec.json", path)
            finished = (out / "stats.json").is_file()
            if saved == fp and not finished:
                return out, True
            if saved == fp:
                why = "holds a finished curation of this spec and input (stats.json)"
            elif saved is not None:
                a, b = _flat(saved), _flat(fp)
                changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                why = f"holds a curation of another spec or input (changed: {', '.join(changed[:4])})"
            else:
                why = "is not empty"
            raise UserError(f"output.path: {path} {why}; pass --overwrite to replace its contents, or choose "
                            "another --output")
    out.mkdir(parents=True, exist_ok=True)
    return out, False


# --- running ------------------------------------------------------------------------------------------------------

def _header(cfg: CurateConfig, out: Path, workers: int) -> dict:
    header = {"name": cfg.name, "input": cfg.input.path, "output": str(out), "format": cfg.output.format,
              "tasks": cfg.run.tasks, "executor": cfg.run.executor, "workers": workers,
              "stages_run": list(cfg.stages)}
    if "minhash_dedup" in cfg.stages:
        b, r = bands_rows(cfg.minhash)
        header["minhash"] = {
            "n_grams": cfg.minhash.n_grams, "bands": b, "rows": r, "num_hashes": b * r,
            "threshold": cfg.minhash.threshold, "lsh_threshold": round(lsh_threshold(b, r), 4),
            "catch_probability": {f"{s:.2f}": round(catch_probability(s, b, r), 4)
                                  for s in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)}}
    header["spec"] = cfg.to_dict()
    return header


def _line(terminal, stage: str, stats_dir: str, before: int | None, seconds: float, note: str = "") -> int:
    from data.curate.stats import merge_stage

    s = merge_stage(Path(stats_dir))
    docs = s["documents"]
    if before is None:  # the input: what was read
        skipped = sum(s.get("skipped", {}).values())
        extra = f" ({skipped:,} lines skipped)" if skipped else ""
        terminal.write(f"curate  {'input':<18} {docs:>12,} docs read{extra:<20} {seconds:8.1f} s{note}\n")
    else:
        terminal.write(f"curate  {stage:<18} {before:>12,} -> {docs:>12,} docs {seconds:8.1f} s{note}\n")
    return docs


def curate(cfg: CurateConfig, overwrite: bool = False) -> dict:
    """Run the curation `cfg` describes (see the module docstring); returns DIR/stats.json's content. With the Slurm
    executor the jobs are submitted and this returns {"submitted": [job ids], "output": DIR} at once."""
    check_extra()
    validate(cfg)
    from data.curate.decontam import check_eval_set, eval_files
    from data.curate.executors import check_executor, local_workers, make_executor, redirected, start_ray

    check_executor(cfg.run.executor)
    files, root = input_files(cfg.input.path)
    check_first_record(files[0], cfg.input.text_field)
    evals: list[Path] = []
    if "decontaminate" in cfg.stages and cfg.decontaminate.eval_path:
        evals = [f.resolve() for f in eval_files(cfg.decontaminate.eval_path)]
        check_eval_set(evals, cfg.decontaminate.text_field)
    fp = fingerprint(cfg, files, evals)
    input_dirs = [Path(cfg.input.path).expanduser().resolve()] if Path(cfg.input.path).expanduser().is_dir() else []
    out, resuming = prepare_output(cfg.output.path, fp, overwrite, files + evals + input_dirs)

    from data.curate.stages import Layout, plan

    layout = Layout(out)
    (layout.work / "logs").mkdir(parents=True, exist_ok=True)
    (layout.work / "spec.json").write_text(json.dumps({"fingerprint": fp, "spec": cfg.to_dict()}, indent=2))
    workers = local_workers(cfg.run.workers) if cfg.run.executor == "local" else cfg.run.workers
    timings_path = layout.work / "timings.json"
    try:
        timings = json.loads(timings_path.read_text()) if resuming and timings_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        timings = {}  # only the progress lines' seconds; a broken file restarts them
    with redirected(str(layout.work / "logs" / "curate.log")) as terminal:
        jobs = plan(cfg, layout, [(str(f), f.stat().st_size) for f in files], str(root), [str(f) for f in evals],
                    _header(cfg, out, workers))  # datatrove's steps log as they are made
        if resuming:
            terminal.write(f"curate  resuming {out} (finished tasks are skipped)\n")
        if cfg.run.executor == "slurm":
            return _submit(cfg, jobs, layout, terminal, make_executor)
        if cfg.run.executor == "ray":
            start_ray(cfg)
        before, stage_skipped = None, True
        stats_dirs = dict(jobs[-1].pipeline[0].stages)
        for job in jobs:
            executor = make_executor(cfg, job, layout.logs(job.name))
            skipped = not executor.get_incomplete_ranks()
            t0 = time.perf_counter()
            try:
                executor.run()
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise CurationFailed(f"stage {job.stage} ({job.name}) failed: {type(e).__name__}: {first}; task "
                                     f"logs: {layout.logs(job.name)}/logs/; rerun the same command to resume") from e
            seconds = time.perf_counter() - t0
            stage_skipped &= skipped
            timings[job.stage] = timings.get(job.stage, 0.0) + seconds
            timings_path.write_text(json.dumps(timings))
            if job.last and job.stage != "stats":
                note = "  (done before)" if stage_skipped else ""
                if job.stage == "decontaminate" and not evals:
                    note += "  (no decontaminate.eval_path: nothing checked)"
                before = _line(terminal, job.stage, stats_dirs[job.stage], before, timings[job.stage], note)
                stage_skipped = True
        stats = json.loads((out / "stats.json").read_text())
        s = stats["summary"]
        terminal.write(f"curate  done: {s['documents_in']:,} -> {s['documents_out']:,} documents in "
                       f"{s.get('seconds', 0):.1f} s; {out}/data ({cfg.output.format}), stats.json, plots/, "
                       "removed/\n")
    return stats


def _submit(cfg: CurateConfig, jobs: list, layout, terminal, make_executor) -> dict:
    previous, ids = None, []
    for job in jobs:
        executor = make_executor(cfg, job, layout.logs(job.name), depends=previous)
        executor.run()  # submits (sbatch), after the job before it
        ids.append(executor.job_id)
        previous = executor
    terminal.write(f"curate  submitted {len(jobs)} Slurm jobs (last {ids[-1]}); {layout.root}/stats.json appears "
                   "when they finish; after a failure, rerun the same command to resume\n")
    return {"submitted": ids, "output": str(layout.root)}


def curate_command(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """`meshforge curate SPEC.py --input X --output DIR [--overwrite] [--workers N] [--stages a,b] [--k.v V]`."""
    check_extra()
    cfg = load_spec(args.spec)
    overrides = dict(overrides)
    for flag, key in ((args.input, "input.path"), (args.output, "output.path"), (args.workers, "run.workers"),
                      (args.stages, "stages")):
        if flag is not None:
            overrides[key] = flag
    cfg = apply_overrides(cfg, overrides)
    try:
        stats = curate(cfg, overwrite=args.overwrite)
    except CurationFailed as e:
        print(f"meshforge: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output": stats.get("output"), **stats.get("summary", {}),
                      **({"submitted": stats["submitted"]} if "submitted" in stats else {})}))
    return 0

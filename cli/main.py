"""The `meshforge` command.

    meshforge train  EXPERIMENT [--workdir DIR] [--section.key VALUE ...]
    meshforge eval   [EXPERIMENT] [--workdir DIR] [--step N] [--quantize int8] [--section.key VALUE ...]
    meshforge sample [EXPERIMENT] [--workdir DIR | --from DIR] [--step N] [--prompt TEXT] [--max-new-tokens N]
                     [--temperature T] [--top-k K] [--top-p P] [--num-samples N] [--seed S]
    meshforge export RUN --format hf|peft --out DIR [--step N]
    meshforge export RUN --format stablehlo|iree --out DIR [--step N] [--quantize int8] [--batch-sizes 1,8]
                     [--target llvm-cpu] [--target-cpu host] [--prompt-len P] [--max-len S]
    meshforge run-exported DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                     [--num-samples N] [--seed S] [--driver local-sync|local-task|...]
    meshforge bench  EXPERIMENT [--section.key VALUE ...] [--steps N] [--warmup N] [--json FILE]
                     [--compare torch|train|diagnostics]
    meshforge bench  EXPERIMENT --compare edge [--workdir RUN] [--json FILE]
    meshforge bench  EXPERIMENT --data-only [--json FILE] [--seconds S] [--section.key VALUE ...]
    meshforge tokenizer train EXPERIMENT [--section.key VALUE ...]
    meshforge bench-data tokenize [--mb 50 | --input FILE] [--tokenizer char|bpe|both] [--num-proc 1,2]
                     [--repeat N] [--json FILE]
    meshforge bench-data curate [--mb 100 | --input CORPUS.jsonl] [--spec SPEC.py] [--workers 2,1] [--repeat N]
                     [--json FILE]
    meshforge plan   [EXPERIMENT] (--hardware v5p-256 [--mfu 0.4] | --measure) [--tokens T] [--params N]
                     [--json FILE] [--section.key VALUE ...]
    meshforge report RUN [RUN ...] [--out DIR]
    meshforge curate SPEC --input CORPUS.jsonl --output DIR [--overwrite] [--workers N] [--stages a,b,...]
                     [--section.key VALUE ...]
    meshforge sweep  EXPERIMENT --space SPACE.py --trials N [--storage URL] [--study NAME] [--workdir DIR]
                     [--pruner median|hyperband|none] [--prune-startup N] [--prune-warmup STEPS]
                     [--sampler tpe|random] [--seed S] [--stale-after S] [--section.key VALUE ...]

Exit codes: 0 done, 2 user error (one line on stderr), 1 bug (traceback).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from parallel.errors import UserError
from train.health import TrainingHalted
from train.workdir import StorageError

VERBS = ("train", "eval", "sample", "bench", "tokenizer", "export", "run-exported", "plan", "report", "sweep", "curate",
         "bench-data")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own mistakes are user errors too: one line, exit 2
        raise UserError(message)


def _parser(verb: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"meshforge {verb}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if verb == "tokenizer":
        p.add_argument("action", choices=["train"], help="train: build the data section's tokenizer into the cache")
    if verb == "export":
        p.add_argument("run", help="the run's workdir, e.g. runs/finetune_lora")
        p.add_argument("--format", choices=["hf", "peft", "stablehlo", "iree"], default="hf", help="hf: a "
                       "transformers model folder (LoRA merged); peft: the LoRA adapters as a PEFT adapter folder; "
                       "stablehlo: prefill/decode/sample functions for any process with jax; iree: the same "
                       "compiled by IREE, run with iree-base-runtime alone")
        p.add_argument("--out", required=True, help="folder to write (must be empty or new)")
        p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
        p.add_argument("--quantize", choices=["int8"], help="stablehlo/iree: int8 weights with per-channel scales")
        _quantize_targets_arg(p)
        p.add_argument("--batch-sizes", default="1", help="iree: the batch sizes to compile a module for, e.g. 1,8")
        p.add_argument("--target", default="llvm-cpu", help="iree: the backend (llvm-cpu: a CPU; vulkan-spirv, "
                       "metal-spirv, cuda)")
        p.add_argument("--target-cpu", default="host", help="iree llvm-cpu: the CPU to compile for (host: this "
                       "one, its vector extensions included; generic: any x86-64; or an LLVM CPU name)")
        p.add_argument("--prompt-len", type=int, default=64, help="stablehlo/iree: the longest prompt, in tokens")
        p.add_argument("--max-len", type=int, default=0, help="stablehlo/iree: cache slots, prompt-len plus the "
                       "tokens to generate (default prompt-len + 256)")
        return p
    if verb == "bench-data":
        _bench_data_args(p)
        return p
    if verb == "curate":
        _curate_args(p)
        return p
    if verb == "report":
        p.add_argument("runs", nargs="+", help="runs' workdirs (metrics.jsonl, summary.json) and sweep folders "
                       "(trials.json)")
        p.add_argument("--out", help="folder for report.md and the PNGs (default: RUN/report for one run or "
                       "sweep, ./report for several)")
        return p
    if verb == "plan":
        p.add_argument("experiment", nargs="?", help="experiment file (or --params N)")
        p.add_argument("--hardware", help="the machine to plan for: NAME-COUNT, e.g. v5p-256 (TensorCores, as "
                       "Cloud TPU names slices), v5e-64, v6e-256, h100-8, a100-64")
        p.add_argument("--tokens", type=float, help="tokens to train (default: the experiment's steps x batch x "
                       "seq_len; with --params: 20 per parameter)")
        p.add_argument("--params", type=float, help="the model's parameter count, without an experiment file")
        p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
        p.add_argument("--measure", action="store_true", help="compile and time the experiment's step on this "
                       "machine and plan with the measured throughput (the hardware is this machine)")
        p.add_argument("--json", help="also write the figures to this JSON file")
        p.set_defaults(workdir=None)
        return p
    if verb == "run-exported":
        p.add_argument("path", help="the --out folder of `meshforge export --format stablehlo|iree`")
        _sampling_args(p)
        p.add_argument("--driver", default="", help="IREE artifacts: the runtime driver (default for llvm-cpu: "
                       "local-sync, one thread; local-task uses all cores, faster for larger models)")
        return p
    needs_experiment = verb in ("train", "bench", "tokenizer", "sweep")
    p.add_argument("experiment", nargs=None if needs_experiment else "?", help="experiment file, e.g. "
                   "experiments/shakespeare_char.py")
    p.add_argument("--workdir", help="the sweep's folder: trial_<number>/ runs, trials.json, best_experiment.py, "
                   "study.db (default: runs/sweeps/<study name>)" if verb == "sweep" else
                   "run directory (default: runs/<experiment name>)")
    if verb in ("train", "sweep"):
        p.add_argument("--coordinator", help="multi-process: address of process 0, host:port")
        p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
        p.add_argument("--process-id", type=int, help="multi-process: this process's index")
    if verb == "sweep":
        _sweep_args(p)
    elif verb == "train":
        p.add_argument("--fresh", action="store_true", help="start over: move an earlier run in the workdir to "
                       "WORKDIR/archive/<time>/ (nothing is deleted) instead of resuming it")
    elif verb == "bench":
        p.add_argument("--data-only", action="store_true", help="time the data pipeline only")
        p.add_argument("--json", help="also write the results to this JSON file")
        p.add_argument("--seconds", type=float, default=3.0, help="--data-only: time each measurement this long")
        p.add_argument("--steps", type=int, default=20, help="timed train steps (default 20)")
        p.add_argument("--warmup", type=int, default=3, help="untimed train steps after compiling (default 3)")
        p.add_argument("--compare", choices=["torch", "train", "edge", "diagnostics"], help="torch: also time a "
                       "plain PyTorch version of the same model and batch, side by side (needs the bench extra); "
                       "train: a real "
                       "train run of the experiment (temporary workdir) between two benches, the loop's step time "
                       "against the step's; edge: the trained run (--workdir) exported as StableHLO and IREE, "
                       "float32 and int8: size on disk and decode tokens/s against meshforge's sampler; "
                       "diagnostics: the step with training diagnostics (log.diagnostics_every) off and on, "
                       "alternating")
    elif verb in ("eval", "sample"):
        p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    if verb == "eval":
        p.add_argument("--quantize", choices=["int8"], help="evaluate the run's weights quantized after training "
                       "(int8, per-channel scales, qwix)")
        _quantize_targets_arg(p)
    if verb == "sample":
        _sampling_args(p)
        p.add_argument("--from", dest="source", help="a HuggingFace model folder or a run's workdir to sample "
                       "from (instead of EXPERIMENT / --workdir)")
    return p


def _bench_data_args(p: argparse.ArgumentParser) -> None:
    """`bench-data WHAT`: throughput of one data-preparation stage on this machine, side by side settings."""
    p.add_argument("what", choices=["tokenize", "curate"], help="tokenize: build the packed data cache of a corpus "
                   "with 1 and 2 (--num-proc) tokenizing processes: seconds, MB/s, documents/s, and whether the caches "
                   "are byte-identical; curate: run a curation spec (--spec) with 2 and 1 (--workers) workers: "
                   "seconds, documents/s, MB/s, and whether the kept documents are byte-identical")
    p.add_argument("--mb", type=float, help="size of the generated corpus in MB (default 50 for tokenize, 100 for "
                   "curate)")
    p.add_argument("--spec", default="", help="curate: the spec (default experiments/curate_default.py)")
    p.add_argument("--workers", default="2,1", help="curate: the worker counts to compare, the first is the "
                   "reference")
    p.add_argument("--input", default="", help="a corpus (file, folder or glob of .txt/.jsonl/.parquet) instead")
    p.add_argument("--split-by", choices=["document", "paragraph", "line"], default="paragraph",
                   help="--input text files: what a document is (default paragraph)")
    p.add_argument("--text-field", default="text", help="--input JSONL/Parquet: the text field (default text)")
    p.add_argument("--tokenizer", choices=["char", "bpe", "both"], default="both")
    p.add_argument("--num-proc", default="1,2", help="the process counts to compare, the first is the baseline")
    p.add_argument("--repeat", type=int, default=1, help="builds per setting, alternating; the best counts")
    p.add_argument("--pack-len", type=int, default=512, help="row length of the cache (default 512)")
    p.add_argument("--workdir", default="", help="keep the corpus and caches here (default: a temporary folder, "
                   "removed after)")
    p.add_argument("--json", help="also write the figures to this JSON file")


def bench_data(args) -> int:
    """`meshforge bench-data`: one benchmark per data stage (tokenize; more stages add a choice and a branch)."""
    check_json_path(args.json)
    if args.what == "curate":
        return bench_data_curate(args)
    try:
        num_procs = tuple(int(x) for x in args.num_proc.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--num-proc: {args.num_proc!r} is not a list of counts; write e.g. 1,2") from None
    from train.bench_tokenize import bench_tokenize, format_result

    kinds = ("char", "bpe") if args.tokenizer == "both" else (args.tokenizer,)
    result = bench_tokenize(mb=args.mb or 50.0, input_path=args.input, tokenizers=kinds, num_procs=num_procs,
                            repeat=args.repeat, pack_len=args.pack_len, split_by=args.split_by,
                            text_field=args.text_field, workdir=args.workdir)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def bench_data_curate(args) -> int:
    try:
        workers = tuple(int(x) for x in args.workers.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--workers: {args.workers!r} is not a list of counts; write e.g. 2,1") from None
    from train.bench_curate import DEFAULT_SPEC, bench_curate, format_result

    result = bench_curate(mb=args.mb or 100.0, input_path=args.input, spec=args.spec or DEFAULT_SPEC,
                          workers=workers, repeat=args.repeat, workdir=args.workdir)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _curate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="curation spec file, e.g. experiments/curate_default.py")
    p.add_argument("--input", help="the corpus: a JSONL file, a folder of them or a glob (sets input.path)")
    p.add_argument("--output", help="the curation folder: data/, removed/<stage>/, stats.json, plots/ (sets "
                   "output.path); must be new or empty, or hold an unfinished curation of the same spec to resume")
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --output folder first (only its "
                   "contents are removed)")
    p.add_argument("--workers", type=int, help="tasks run at once (sets run.workers; 0: all cores)")
    p.add_argument("--stages", help="the stages to run, in order, comma-separated (sets stages)")


def _quantize_targets_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize-targets", default="", help="with --quantize: the weights to quantize, a regex over "
                   "parameter paths like blocks/0/attn/wq_DNH (default: the attention and MLP projections)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                   "whose probability reaches p (1: all)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="a Python file defining space(trial) with Optuna's define-by-run "
                   "API, returning {'optim.lr': trial.suggest_float('optim.lr', 1e-4, 1e-2, log=True), ...}")
    p.add_argument("--trials", type=int, required=True, help="stop when the study holds this many finished trials "
                   "(complete, pruned or failed; a trial whose worker died runs again and counts once)")
    p.add_argument("--storage", help="the study's Optuna storage: an SQLAlchemy URL (postgresql://..., "
                   "sqlite:///PATH) or journal:PATH (a path ending in .log or .jsonl is a journal file too); "
                   "default sqlite:///WORKDIR/study.db. Workers on other machines join with the same URL")
    p.add_argument("--study", help="the study's name (default: the experiment's name)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median", help="stop trials whose "
                   "validation loss at an evaluation is behind the others' (default median)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="how the next trial's values are "
                   "chosen (default tpe)")
    p.add_argument("--seed", type=int, help="the sampler's seed (workers sharing a study: give each its own)")
    p.add_argument("--prune-startup", type=int, default=3, help="median: trials that complete before any is "
                   "pruned (default 3)")
    p.add_argument("--prune-warmup", type=int, default=0, help="evaluations before this train step never prune "
                   "(default 0)")
    p.add_argument("--stale-after", type=float, default=120.0, help="a running trial whose worker on another "
                   "machine has sent no heartbeat for this many seconds is run again (default 120; a dead worker "
                   "on this machine is seen at once)")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate `--section.key VALUE` / `--section.key=VALUE` overrides from the verb's own flags."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if "." in name:
            if "=" in a:
                overrides[name] = a.split("=", 1)[1]
            elif i + 1 < len(argv):
                overrides[name] = argv[i + 1]
                i += 1
            else:
                raise UserError(f"--{name}: missing value")
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _config(verb: str, args, overrides):
    """The run config: the experiment file (train), or the run's saved config.json (eval, sample)."""
    from train.config import apply_overrides, from_dict, load_experiment

    if args.experiment:
        cfg = load_experiment(args.experiment)
    elif args.workdir:
        path = Path(args.workdir) / "config.json"
        if not path.exists():
            raise UserError(f"--workdir {args.workdir}: no config.json; pass the experiment file too")
        cfg = from_dict(json.loads(path.read_text()))
    else:
        raise UserError("give an experiment file or --workdir of a finished run")
    cfg = apply_overrides(cfg, overrides)
    workdir = Path(args.workdir) if args.workdir else Path("runs") / cfg.name
    if verb in ("eval", "sample") and args.experiment and (workdir / "config.json").exists():
        # eval/sample on an existing run: its saved config is the one its checkpoints were made with
        saved = from_dict(json.loads((workdir / "config.json").read_text()))
        cfg = apply_overrides(saved, overrides)
    return cfg, workdir


def apply_experiment(path: str, overrides: dict):
    from train.config import apply_overrides, load_experiment

    return apply_overrides(load_experiment(path), overrides)


def plan_accounting(overrides: dict):
    """`plan --params N` has no experiment: only the accounting section's settings mean anything there."""
    from train.config import Config, apply_overrides

    if other := [k for k in overrides if not k.startswith("accounting.")]:
        raise UserError(f"--{other[0]}: without an experiment file only accounting.* settings apply; give the "
                        "experiment file to plan its model")
    return apply_overrides(Config(), overrides).accounting


def run(verb: str, argv: list[str]) -> int:
    rest, overrides = split_overrides(argv)
    args = _parser(verb).parse_args(rest)
    if verb == "curate":  # datatrove's pipeline; nothing of jax
        from data.curate.run import curate_command
        from data.curate.spec import check_extra

        check_extra()
        return curate_command(args, overrides)
    if verb == "run-exported":  # before anything imports jax: an IREE artifact runs without it
        from interop.edge_runner import run_exported

        return run_exported(Path(args.path), args)
    if verb == "bench-data":
        if overrides:
            raise UserError(f"--{next(iter(overrides))}: bench-data reads no experiment; see meshforge bench-data -h")
        return bench_data(args)
    if verb == "export":
        from interop.export_run import export_run

        print(json.dumps(export_run(Path(args.run), args.format, Path(args.out), args.step, args)))
        return 0
    if verb in ("report", "sweep"):
        for module in ("optuna", "matplotlib") if verb == "report" else ("optuna",):
            if importlib.util.find_spec(module) is None:
                raise UserError(f"meshforge {verb} needs {module}: pip install -e '.[lab]'")
    if verb == "report":
        from lab.report import report

        report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
        return 0
    if verb == "plan" and args.measure and not args.experiment:
        raise UserError("--measure compiles the experiment's step: give the experiment file")
    if verb == "plan" and not args.measure:  # no device is touched: nothing to configure
        from lab.plan import run_plan

        check_json_path(args.json)
        if args.experiment:
            cfg = apply_experiment(args.experiment, overrides)
            acct = cfg.accounting
        else:
            cfg, acct = None, plan_accounting(overrides)
        run_plan(cfg, acct, hardware=args.hardware, tokens=args.tokens, params=args.params, mfu=args.mfu,
                 measure=False, json_path=args.json)
        return 0
    if verb == "sample" and args.source and is_hf(args.source):
        return sample_hf(args, overrides)
    if verb == "sample" and args.source:
        args.workdir = args.source
    cfg, workdir = _config(verb, args, overrides)
    initial = None  # pretrained parameters for a new fine-tuning run
    if verb in ("train", "sweep") and cfg.train.init_from:  # a sweep's new trials all start from the same weights
        from interop.pretrained import resuming_point, starting_point
        from train.checkpoint import has_checkpoints

        if verb == "train" and has_checkpoints(workdir / "checkpoints") and not args.fresh and \
                (workdir / "config.json").is_file():
            cfg, initial = resuming_point(cfg, workdir), None
        else:
            cfg, initial = starting_point(cfg)
    if verb == "sweep":  # the space is checked before anything else; its first trial's config sizes the devices
        import shlex

        from lab.sweep import prepare

        sweep_spec, cfg = prepare(args, cfg, overrides, command=shlex.join(["meshforge", "sweep", *argv]))

    from parallel.mesh import configure_cpu_devices, default_cpu_devices, maybe_initialize_distributed, \
        resolve_launch

    if verb == "tokenizer":
        return tokenizer_train(cfg)
    if verb == "bench" and args.compare == "edge":  # one CPU device, as an edge runtime has
        from interop.bench_edge import compare_edge

        check_json_path(args.json)
        compare_edge(workdir, json_path=args.json)
        return 0
    launch = resolve_launch(args.coordinator, args.num_processes, args.process_id) if verb in ("train", "sweep") \
        else None
    rows = cfg.train.batch_size // max(1, cfg.optim.accum_steps)
    if cfg.outer.replicas:  # the data axis splits each replica's rows; mesh.replica groups hold R / replica each
        rows = rows * cfg.mesh.replica // cfg.outer.replicas
    processes = launch.num_processes if launch else 1
    configure_cpu_devices(cfg.mesh.cpu_devices or default_cpu_devices(cfg.mesh, rows, processes=processes))
    if verb in ("train", "sweep"):
        maybe_initialize_distributed(launch)
    from train.setup import use_compile_cache

    use_compile_cache(cfg.train.compile_cache)
    if verb == "bench":
        return bench(cfg, args)
    if verb == "plan":
        from lab.plan import run_plan

        check_json_path(args.json)
        run_plan(cfg, cfg.accounting, hardware=args.hardware, tokens=args.tokens, params=args.params, mfu=args.mfu,
                 measure=True, json_path=args.json)
        return 0
    if verb == "train":
        from train.loop import train

        train(cfg, workdir, fresh=args.fresh, initial=initial, started=command_started())
        return 0
    if verb == "sweep":
        from lab.sweep import run_sweep

        return run_sweep(sweep_spec, initial)

    if verb == "sample":
        from interop.sample import sample_run
        from train.restore import load_for_inference

        return sample_run(load_for_inference(cfg, workdir, args.step), args)
    from train.loop import eval_step_for, evaluate
    from train.restore import restore_for_inference

    if args.quantize_targets and not args.quantize:
        raise UserError("--quantize-targets: give --quantize int8 too (it says which weights that quantizes)")
    if args.quantize and importlib.util.find_spec("qwix") is None:
        raise UserError("--quantize int8 needs qwix: pip install -e '.[edge]'")
    setup, params, step = restore_for_inference(cfg, workdir, args.step)
    if args.quantize:
        from models.quant import quantized_params

        try:
            params = quantized_params(params, setup.mdef.logical_axes(), setup.shardings["params"], args.quantize,
                                      args.quantize_targets or None)
        except ValueError as e:
            raise UserError(f"--quantize-targets: {e}") from None
    from parallel.rules import activate

    with activate(setup.mesh):
        losses = evaluate(setup, params, eval_step_for(setup), setup.cfg.train.eval_batches)
        from train.task_eval import task_evaluator

        task_eval = task_evaluator(setup)
        tasks = {k: round(v, 6) for k, v in task_eval(params).items()} if task_eval else {}
    from train.metrics import json_value

    losses = {k: json_value(round(v, 6)) for k, v in losses.items()}  # val_loss, and val_loss_<name> per source
    quant = {"quantize": args.quantize} if args.quantize else {}
    print(json.dumps({"step": step, **losses, **tasks, **quant, "workdir": str(workdir)}))
    return 0


def command_started() -> float:
    """perf_counter() at the command's start. For a `meshforge` process (Linux) that is the process's own start,
    interpreter and imports included; when main() runs inside a longer-lived interpreter (a notebook, a test),
    or /proc is not there, it is now."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return now
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return now - age if 0 <= age < 60 else now  # a command reaches main() seconds after its process started


def is_hf(path: str) -> bool:
    from interop.pretrained import is_hf_folder

    return is_hf_folder(Path(path).expanduser())


def sample_hf(args, overrides) -> int:
    from interop.sample import sample_folder
    from parallel.mesh import configure_cpu_devices, default_cpu_devices
    from train.config import Config, apply_overrides

    cfg = apply_overrides(Config(), overrides)
    configure_cpu_devices(cfg.mesh.cpu_devices or default_cpu_devices(cfg.mesh, args.num_samples))
    return sample_folder(Path(args.source).expanduser(), cfg, args)


def check_json_path(path: str | None) -> None:
    """Find out now, not after the whole benchmark ran, that the report cannot be written."""
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).touch()
        except OSError as e:
            raise UserError(f"--json {path}: cannot write there ({e.strerror})") from None


def bench(cfg, args) -> int:
    """Compile and time the train step (train/bench.py), or with --data-only the input pipeline alone."""
    check_json_path(args.json)
    if args.compare and args.data_only:
        raise UserError("--compare and --data-only: pick one (--compare times the train step)")
    if args.compare == "torch":
        from interop.bench_torch import compare

        compare(cfg, steps=args.steps, warmup=args.warmup, json_path=args.json)
        return 0
    if args.compare == "diagnostics":
        from train.bench_diagnostics import compare_diagnostics

        compare_diagnostics(cfg, steps=args.steps, warmup=args.warmup, json_path=args.json)
        return 0
    if args.compare == "train":
        from train.bench_loop import compare_train

        compare_train(cfg, steps=args.steps, warmup=args.warmup, json_path=args.json)
        return 0
    if not args.data_only:
        from train.bench import bench as bench_step

        bench_step(cfg, steps=args.steps, warmup=args.warmup, json_path=args.json)
        return 0
    from train.bench_data import bench_data, format_table

    result = bench_data(cfg, seconds=args.seconds)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def tokenizer_train(cfg) -> int:
    """Fit the data section's tokenizer into the cache (a run copies it into its workdir as tokenizer.json)."""
    if cfg.data.mode != "packed":
        raise UserError("data.mode: tokenizer train builds the cached tokenizer of data.mode packed; windows mode "
                        "fits its tokenizer to the text at the start of each run")
    if cfg.data.tokenizer_path:
        raise UserError(f"data.tokenizer_path: {cfg.data.tokenizer_path} is given, so there is nothing to train; "
                        "clear it to build the tokenizer from the data")
    from data.cache import get_tokenizer
    from data.tokenize import fingerprint

    tok, path = get_tokenizer(cfg.data, retrain=True)
    print(json.dumps({"kind": tok.kind, "vocab_size": tok.vocab_size, "fingerprint": fingerprint(tok),
                      "path": str(path) if path else None}))
    return 0


def _quiet_background_noise() -> None:
    """Orbax writes through asyncio tasks in background threads. When a write fails (disk full) the error
    reaches the loop, which reports it in one line; the same error must not also print as dozens of
    'Task exception was never retrieved' / 'Event loop is closed' tracebacks from those threads."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax's own errors reach us as exceptions anyway
    previous = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
            previous(u)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    _quiet_background_noise()
    try:
        return run(argv[0], argv[1:])
    except StorageError as e:
        # The disk is full or read-only: every cleanup handler (TensorBoard, Orbax threads) would fail again
        # and print its own traceback. The one line says it all; leave without running them.
        print(f"meshforge: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except UserError as e:
        print(f"meshforge: error: {e}", file=sys.stderr)
        return 2
    except TrainingHalted as e:
        print(f"meshforge: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("meshforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        # A failed allocation anywhere (not only in the checked train step: evaluation, sampling, a restore) is a
        # size the user chose. Leave at once: cleanup handlers waiting on buffers that were never allocated
        # could block for ever. Orbax commits atomically, so the last checkpoint stays valid.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"meshforge: error: out of memory ({first}); {OOM_KNOBS}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)


OOM_KNOBS = ("lower train.batch_size, train.eval_batch_size or train.seq_len, use a smaller model, raise "
             "optim.accum_steps, use model.remat with model.scan_layers, or shard over more devices")


def is_out_of_memory(e: BaseException) -> bool:
    """XLA's allocation failure (RESOURCE_EXHAUSTED), whichever of jax's error types carries it."""
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(e)


if __name__ == "__main__":
    sys.exit(main())

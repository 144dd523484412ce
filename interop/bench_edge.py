"""`meshforge bench EXPERIMENT --compare edge`: the run's exported artifacts against meshforge's own sampler.

Exports the trained run (the experiment's workdir, or --workdir) as StableHLO in float32 and int8 and as an IREE
module for this CPU (batch 1), then prints side by side, in one process: the size of each artifact on disk, and
the decode speed at batch 1 of meshforge's KV-cache sampler, the StableHLO artifact (jax.export) and the IREE
module (iree-base-runtime). Each does the same work: a prompt, then N greedy tokens; speed is N / seconds, the
median of a few runs after a warm-up run (compilation). A benchmark command, not a test.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from interop.bench_generate import cpu_model, load_average
from interop.bench_torch import vector_extensions
from interop.edge_runner import generate, load_artifact
from interop.export_run import export_run
from parallel.errors import UserError

ARTIFACTS = {  # name: (format, quantize)
    "stablehlo_f32": ("stablehlo", ""),
    "stablehlo_int8": ("stablehlo", "int8"),
    "iree_f32": ("iree", ""),
    "iree_int8": ("iree", "int8"),
}


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of the next `repeats`)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def compare_edge(run: Path, *, new_tokens: int = 256, repeats: int = 7, json_path: str | None = None) -> dict:
    from train.checkpoint import has_checkpoints

    if not has_checkpoints(run / "checkpoints"):
        raise UserError(f"bench --compare edge: {run} has no checkpoint; train the experiment first (or pass the "
                        "run's --workdir)")
    prompt_len = 16
    result: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "vector_extensions": vector_extensions(),
                    "run": str(run), "new_tokens": new_tokens, "prompt_tokens": prompt_len, "batch": 1,
                    "load_average": load_average()}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="meshforge-bench-edge-") as tmp:
        for name, (fmt, quantize) in ARTIFACTS.items():
            out = Path(tmp) / name
            args = SimpleNamespace(batch_sizes="1", target="llvm-cpu", target_cpu="host", quantize=quantize,
                                   quantize_targets="", prompt_len=prompt_len, max_len=prompt_len + new_tokens)
            t = time.perf_counter()
            export_run(run, fmt, out, None, args)
            result[f"{name}_export_s"] = round(time.perf_counter() - t, 2)
            result[f"{name}_bytes"] = sum(p.stat().st_size for p in out.iterdir())
            manifest, backend = load_artifact(out, 1)
            vocab = manifest["vocab_limit"]
            prompt = rng.integers(0, vocab, prompt_len)
            first, median = _timed(lambda: generate(manifest, backend, [prompt], new_tokens, 0.0, 0, 1.0, 0), repeats)
            result[f"{name}_first_s"], result[f"{name}_tokens_per_s"] = round(first, 3), round(new_tokens / median, 1)
        result["meshforge_first_s"], result["meshforge_tokens_per_s"] = _meshforge(run, prompt, new_tokens, repeats)
        result["step"] = manifest["step"]
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _meshforge(run: Path, prompt: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, float]:
    """meshforge's own sampler (train/generate.py) on one device, greedy, batch 1."""
    import dataclasses

    from train.config import from_dict
    from train.generate import Generator, Sampling
    from train.restore import load_for_inference

    cfg = from_dict(json.loads((run / "config.json").read_text()))
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=1, expert=1,
                                                            cpu_devices=1))
    loaded = load_for_inference(cfg, run)
    gen = Generator(loaded.mdef, loaded.mesh, loaded.param_shardings, vocab_limit=loaded.tokenizer.vocab_size,
                    eos_id=None)
    first, median = _timed(lambda: gen.generate(loaded.params, [prompt], new_tokens, Sampling()), repeats)
    return round(first, 3), round(new_tokens / median, 1)


def format_table(r: dict) -> str:
    mb = lambda n: f"{n / 1e6:7.2f} MB"  # noqa: E731
    lines = [f"machine   {r['cpu']} | {r['cores']} cores | {' '.join(r['vector_extensions']) or '-'}",
             f"run       {r['run']} (step {r['step']}): {r['prompt_tokens']}-token prompt, {r['new_tokens']} greedy "
             "tokens, batch 1",
             f"{'':24s} {'on disk':>10s} {'tokens/s':>10s} {'first call':>11s}",
             f"{'meshforge sampler':24s} {'':>10s} {r['meshforge_tokens_per_s']:10.1f} {r['meshforge_first_s']:10.2f}s"]
    for name in ARTIFACTS:
        lines.append(f"{name:24s} {mb(r[name + '_bytes']):>10s} {r[name + '_tokens_per_s']:10.1f} "
                     f"{r[name + '_first_s']:10.2f}s")
    lines.append(f"int8 / float32 on disk: {r['stablehlo_int8_bytes'] / r['stablehlo_f32_bytes']:.2f}; IREE / "
                 f"meshforge tokens/s: {r['iree_f32_tokens_per_s'] / r['meshforge_tokens_per_s']:.2f}")
    return "\n".join(lines)

"""Generation speed, side by side: meshforge's KV-cache generator vs transformers `generate` (PyTorch CPU), greedy,
float32, on the same HuggingFace folder (e.g. one `meshforge export` wrote).

    python -m interop.bench_generate --make-model /tmp/bench-llama    # a small random Llama-style folder
    python -m interop.bench_generate --from /tmp/bench-llama [--new-tokens 128] [--prompt-len 64]
        [--batches 1,8] [--repeats 3] [--torch-threads auto] [--json FILE]

Both sides decode N new tokens after a random prompt of the given length (every row the same length, no padding)
with no end-of-sequence stop, so each does the whole budget. Speed is new tokens x batch / seconds, the median
over the repeats; the first call of each side is a warm-up, reported apart (meshforge's is mostly compilation).
`same` is the fraction of new tokens on which both sides agree (a sanity check of the comparison: float32 greedy
decoding should agree nearly everywhere). transformers runs at each --torch-threads count (auto: 1 and torch's
default) and is reported at its fastest. A benchmark command, not a test: torch and transformers are extras.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # one CPU device per core, as meshforge runs on a CPU host; set before jax starts
    from parallel.mesh import configure_cpu_devices

    configure_cpu_devices(os.cpu_count() or 1)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from parallel.errors import UserError  # noqa: E402
from train.hardware import cpu_model, load_average  # noqa: E402,F401  (bench_edge, bench_torch use them)


def make_model(folder: Path, seed: int = 0) -> dict:
    """Write a small random Llama-style HF folder (config.json + model.safetensors): no download needed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "README.md").write_text("Random weights (transformers' own init, seed %d): a Llama-style model for "
                                      "interop/bench_generate.py only; it knows no language.\n" % seed)
    n = sum(p.numel() for p in model.parameters())
    return {"folder": str(folder), "params": n, "random": True}


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise UserError(f"--batches {text!r}: give comma-separated batch sizes >= 1, e.g. 1,8")
    return batches


class Meshforge:
    """The folder in float32 with the KV-cache generator (greedy, no EOS), the batch split over as many of the
    CPU devices (one per core) as divide it: batch 1 runs on one device."""

    def __init__(self, folder: Path):
        from interop.hf_import import hf_model_config, real_vocab_size
        from models.transformer import ModelConfig
        from train.state import model_def

        self.folder = folder
        self.mdef = model_def(hf_model_config(folder, ModelConfig(dtype="float32", attention_impl="xla")))
        self.vocab = real_vocab_size(folder)
        self._by_devices: dict[int, tuple] = {}

    def devices_for(self, batch: int) -> int:
        return max(n for n in range(1, jax.device_count() + 1) if batch % n == 0)

    def _generator(self, n_devices: int):
        if n_devices not in self._by_devices:
            from interop.hf_import import load_hf_params
            from parallel.mesh import MeshConfig, make_mesh
            from parallel.rules import activate
            from train.generate import Generator
            from train.state import param_shardings

            mesh = make_mesh(MeshConfig(data=n_devices), jax.devices()[:n_devices])
            shardings = param_shardings(self.mdef, mesh)
            with activate(mesh):
                params = load_hf_params(self.folder, self.mdef, shardings)
            gen = Generator(self.mdef, mesh, shardings, vocab_limit=self.vocab, eos_id=None)
            self._by_devices[n_devices] = (gen, params)
        return self._by_devices[n_devices]

    def __call__(self, prompts_BP: np.ndarray, n: int) -> np.ndarray:
        gen, params = self._generator(self.devices_for(len(prompts_BP)))
        return np.stack(gen.generate(params, list(prompts_BP), n))


class Transformers:
    """The folder in transformers, float32, eval mode, under torch.inference_mode (greedy, no EOS)."""

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # run the whole budget, as meshforge does

    def __call__(self, prompts_BP: np.ndarray, n: int, threads: int) -> np.ndarray:
        torch = self.torch
        torch.set_num_threads(threads)
        ids = torch.as_tensor(prompts_BP, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                      pad_token_id=0)
        return out[:, prompts_BP.shape[1]:].numpy()


def parse_threads(text: str, default: int) -> list[int]:
    """Torch thread counts to try. "auto": 1 and torch's default. On a shared machine torch's OpenMP threads
    wait on each other at every op whenever one is descheduled, so one thread can be several times faster than
    all cores; transformers is reported at its fastest setting so the comparison does not handicap it."""
    if text == "auto":
        return sorted({1, default})
    try:
        threads = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        threads = []
    if not threads or threads[0] < 1:
        raise UserError(f"--torch-threads {text!r}: give auto or comma-separated thread counts >= 1, e.g. 1,2")
    return threads


def run(folder: Path, *, new_tokens: int, prompt_len: int, batches: list[int], repeats: int, torch_threads: str,
        seed: int = 0) -> dict:
    import torch

    if new_tokens < 1 or prompt_len < 1 or repeats < 1:
        raise UserError("--new-tokens, --prompt-len and --repeats must be >= 1")
    default_threads = torch.get_num_threads()
    threads = parse_threads(torch_threads, default_threads)
    mf, hf = Meshforge(folder), Transformers(folder)
    cfg = mf.mdef.cfg
    if cfg.positions == "learned" and prompt_len + new_tokens > cfg.max_seq_len:
        raise UserError(f"--prompt-len + --new-tokens = {prompt_len + new_tokens} exceed the model's "
                        f"{cfg.max_seq_len} positions; ask for fewer")
    sides = {"meshforge": mf, **{f"transformers@{t}": functools.partial(hf, threads=t) for t in threads}}
    rng = np.random.default_rng(seed)
    report = {"folder": str(folder), "new_tokens": new_tokens, "prompt_len": prompt_len, "repeats": repeats,
              "cpu": cpu_model(), "cores": os.cpu_count(), "torch_default_threads": default_threads,
              "torch_threads_tried": threads, "jax": f"{jax.__version__}, {jax.default_backend()}, {jax.device_count()} devices "
                     "(the batch split over those that divide it)",
              "load_average_before": load_average(),
              "model": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                        "kv_heads": cfg.kv_heads, "vocab": mf.vocab,
                        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mf.mdef.param_shapes()))},
              "rows": []}
    for b in batches:
        prompts_BP = rng.integers(0, mf.vocab, (b, prompt_len)).astype(np.int32)
        warm, times, outs = {}, {name: [] for name in sides}, {}
        for name, fn in sides.items():  # the first call: compilation (meshforge), allocator and caches (torch)
            t = time.perf_counter()
            fn(prompts_BP, new_tokens)
            warm[name] = time.perf_counter() - t
        for _ in range(repeats):  # interleaved, so that load from other processes falls on both sides alike
            for name, fn in sides.items():
                t = time.perf_counter()
                outs[name] = fn(prompts_BP, new_tokens)
                times[name].append(time.perf_counter() - t)
        row = {"batch": b}
        for name in sides:
            sec = statistics.median(times[name])
            row[name] = {"tokens_per_s": new_tokens * b / sec, "median_s": sec, "times_s": times[name],
                         "warmup_s": warm[name]}
        best = max((f"transformers@{t}" for t in threads), key=lambda k: row[k]["tokens_per_s"])
        row["transformers"] = {**row[best], "threads": int(best.split("@")[1])}
        row["ratio"] = row["meshforge"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        row["same_tokens"] = float(np.mean(outs["meshforge"] == outs[best]))
        report["rows"].append(row)
    report["load_average_after"] = load_average()
    return report


def table(r: dict) -> str:
    m = r["model"]
    lines = [
        f"greedy decoding, {r['new_tokens']} new tokens after a {r['prompt_len']}-token prompt, float32, "
        f"median of {r['repeats']} (interleaved)",
        f"model: {r['folder']} ({m['layers']} layers, d_model {m['d_model']}, {m['heads']} heads / "
        f"{m['kv_heads']} kv, vocab {m['vocab']}, {m['params'] / 1e6:.1f}M params)",
        f"CPU: {r['cpu']}, {r['cores']} cores; jax {r['jax']}; torch threads tried {r['torch_threads_tried']} "
        f"(default {r['torch_default_threads']}); load average {r['load_average_before']} before, "
        f"{r['load_average_after']} after",
        "",
        f"{'batch':>5} | {'meshforge tok/s':>15} | {'transformers tok/s':>18} | {'threads':>7} | {'ratio':>6} | "
        f"{'mf warm-up s':>12} | {'hf warm-up s':>12} | {'same':>5}",
    ]
    for row in r["rows"]:
        mf, hf = row["meshforge"], row["transformers"]
        lines.append(f"{row['batch']:>5} | {mf['tokens_per_s']:>15.1f} | {hf['tokens_per_s']:>18.1f} | "
                     f"{hf['threads']:>7} | {row['ratio']:>6.2f} | {mf['warmup_s']:>12.2f} | "
                     f"{hf['warmup_s']:>12.2f} | {row['same_tokens']:>5.2f}")
    if len(r["torch_threads_tried"]) > 1:
        for row in r["rows"]:
            each = ", ".join(f"{t} threads {row[f'transformers@{t}']['tokens_per_s']:.1f}"
                             for t in r["torch_threads_tried"])
            lines.append(f"transformers tok/s at batch {row['batch']}: {each}")
    lines.append("transformers at its fastest thread count; ratio = meshforge / transformers tokens/s; warm-up = "
                 "first call (meshforge: mostly compilation); same = fraction of equal new tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m interop.bench_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="folder", help="HuggingFace folder (config.json + *.safetensors)")
    ap.add_argument("--make-model", metavar="DIR", help="write a small random Llama-style HF folder to DIR")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", default="auto", help="auto (1 and torch's default) or e.g. 1,2")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    try:
        if args.make_model:
            made = make_model(Path(args.make_model).expanduser())
            print(f"wrote {made['folder']}: random Llama-style model, {made['params'] / 1e6:.1f}M params")
        if not args.folder:
            if args.make_model:
                return 0
            raise UserError("--from: give an HF folder to benchmark (or --make-model DIR to write one)")
        folder = Path(args.folder).expanduser()
        report = run(folder, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                     batches=parse_batches(args.batches), repeats=args.repeats,
                     torch_threads=args.torch_threads)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

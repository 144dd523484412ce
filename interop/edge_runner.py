"""`meshforge run-exported PATH`: generate text from an exported artifact (interop/edge_export.py), as
`meshforge sample` does, to check it on the device it will run on.

A StableHLO artifact runs through `jax.export` (jax and numpy; no model code). An IREE artifact runs with the
`iree-base-runtime` package, numpy and the tokenizer: this path must never import jax (the CLI imports this module
before anything that would), so it runs where JAX cannot be installed. The decode loop is meshforge's own
(train/generate.py), step for step: left-padded prompts, the exported sampling rule with the key split per token,
rows that wrote their end-of-sequence token fed it again, and the output cut after it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.tokenize import load_tokenizer
from parallel.errors import UserError

FORMAT_VERSION = 1  # of the artifacts interop/edge_export.py writes


class _Jax:
    """The three functions of a StableHLO artifact, any batch."""

    def __init__(self, path: Path, manifest: dict, rows: int, driver: str = ""):
        if driver:
            raise UserError("--driver: applies to IREE artifacts; this one is StableHLO (it runs on jax's CPU)")
        try:
            import jax
            from jax import export
        except ImportError:
            raise UserError("run-exported: a StableHLO artifact needs jax (pip install jax); export an IREE one "
                            "for a device without it") from None

        # jit once: Exported.call alone traces again on every call
        self.fns = {name: jax.jit(export.deserialize(bytearray((path / file).read_bytes())).call)
                    for name, file in manifest["modules"].items()}
        self.weights = jax.device_put(dict(np.load(path / "weights.npz")))  # on the device once, not per call
        self.rows = rows

    def prefill(self, tokens, starts):
        return self.fns["prefill"](self.weights, tokens, starts)

    def decode(self, token, cache, starts):
        return self.fns["decode"](self.weights, token, cache, starts)

    def pick(self, logits, key, temperature, top_k, top_p):
        token, key = self.fns["pick"](logits, key, np.float32(temperature), np.int32(top_k), np.float32(top_p))
        return np.asarray(token), key

    def host(self, x):
        return np.asarray(x)


class _Iree:
    """The modules of an IREE artifact for the smallest compiled batch that holds the rows (weights uploaded once)."""

    def __init__(self, path: Path, manifest: dict, rows: int, driver: str = ""):
        try:
            import iree.runtime as rt
        except ImportError:
            raise UserError("run-exported: an IREE artifact needs the IREE runtime: pip install iree-base-runtime "
                            "(or meshforge's edge extra)") from None
        fits = [b for b in manifest["batch_sizes"] if b >= rows]
        if not fits:
            raise UserError(f"--num-samples {rows}: the artifact's largest batch is {max(manifest['batch_sizes'])}; "
                            "export it with a larger --batch-sizes")
        self.rows = fits[0]
        # llvm-cpu: local-sync runs each op on the calling thread; local-task spreads ops over the cores, which only
        # pays for larger models (shakespeare_char decodes 3x faster with local-sync on a 2-core VM)
        driver = driver or {"llvm-cpu": "local-sync", "vulkan-spirv": "vulkan", "metal-spirv": "metal",
                            "cuda": "cuda"}[manifest["target"]]
        try:
            config = rt.Config(driver)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--driver {driver}: the IREE runtime cannot use it here ({e})") from None
        ctx = rt.SystemContext(config=config)
        self.fns, self.kept = {}, {}
        for name in ("prefill", "decode", "pick"):
            module_name = f"{name}_b{self.rows}"
            module = rt.VmModule.copy_buffer(ctx.instance, (path / manifest["modules"][module_name]).read_bytes())
            ctx.add_vm_module(module)
            self.fns[name] = ctx.modules[module.name].main
            self.kept[name] = manifest["kept_args"][module_name]
        weights = np.load(path / "weights.npz")
        # jax flattens a dict argument in sorted key order: the modules take the weights that way
        self.weights = [rt.asdevicearray(config.device, weights[k]) for k in sorted(weights.files)]

    def _call(self, name: str, *args):
        return self.fns[name](*(args[i] for i in self.kept[name]))

    def prefill(self, tokens, starts):
        logits, *cache = self._call("prefill", *self.weights, tokens, starts)
        return logits, cache

    def decode(self, token, cache, starts):
        logits, *cache = self._call("decode", *self.weights, token, *cache, starts)
        return logits, cache

    def pick(self, logits, key, temperature, top_k, top_p):
        token, key = self._call("pick", logits, key, np.float32(temperature), np.int32(top_k), np.float32(top_p))
        return np.asarray(token.to_host()), key

    def host(self, x):
        return np.asarray(x.to_host())


def load_artifact(path: Path, rows: int, driver: str = ""):
    """(manifest, backend) of the artifact in `path` for `rows` sequences at a time (`driver`: IREE's, by default
    the target's own)."""
    if not (path / "manifest.json").is_file():
        raise UserError(f"run-exported: {path} holds no exported model (no manifest.json); give the --out folder "
                        "of `meshforge export --format stablehlo|iree`")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"run-exported: {path / 'manifest.json'} is damaged ({e}); export the run again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"run-exported: {path} was written by another version of meshforge export (format "
                        f"{manifest.get('format_version')}, this runner reads {FORMAT_VERSION}); export it again")
    backend = {"stablehlo": _Jax, "iree": _Iree}.get(manifest.get("format"))
    if backend is None:
        raise UserError(f"run-exported: {path} holds a {manifest.get('format')!r} export; only stablehlo and iree "
                        "artifacts run here")
    return manifest, backend(path, manifest, rows, driver)


def generate(manifest: dict, backend, prompts: list[np.ndarray], max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: int) -> list[np.ndarray]:
    """New tokens of each prompt (cut after the end-of-sequence token, which is kept): Generator.generate's loop."""
    P, slots = manifest["prompt_len"], manifest["slots"]
    longest = max(len(p) for p in prompts)
    if longest > P:
        raise UserError(f"--prompt: {longest} tokens; this artifact takes prompts of up to {P} (export it with a "
                        "larger --prompt-len)")
    if P + max_new_tokens > slots:
        raise UserError(f"--max-new-tokens {max_new_tokens}: this artifact holds {slots - P} new tokens after a "
                        "prompt (export it with a larger --max-len)")
    if manifest["learned_positions"] and longest + max_new_tokens > manifest["max_seq_len"]:
        raise UserError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the model's "
                        f"{manifest['max_seq_len']} learned positions")
    if not 0 <= seed < 2 ** 32:
        raise UserError(f"--seed {seed}: give a seed in [0, 2^32)")
    eos = -1 if manifest["eos_id"] is None else manifest["eos_id"]
    rows, n = backend.rows, len(prompts)
    tokens, starts = np.zeros((rows, P), np.int32), np.zeros(rows, np.int32)
    for i in range(rows):
        p = np.asarray(prompts[min(i, n - 1)], np.int32)
        tokens[i, P - len(p):], starts[i] = p, P - len(p)
    logits, cache = backend.prefill(tokens, starts)
    key = np.array([0, seed], np.uint32)  # jax.random.key(seed)'s data (threefry)
    done = np.zeros(rows, bool)
    out = np.full((rows, max_new_tokens), eos, np.int32)
    for i in range(max_new_tokens):
        if done.all():
            break
        token, key = backend.pick(logits, key, temperature, top_k, top_p)
        token = np.where(done, eos, token).astype(np.int32)
        out[:, i] = token
        done |= token == eos
        logits, cache = backend.decode(token, cache, starts)
    result = []
    for row in out[:n]:
        stop = np.flatnonzero(row == eos)
        result.append(row[: stop[0] + 1] if len(stop) else row)
    return result


def run_exported(path: Path, args) -> int:
    """Print what `meshforge sample` prints for the same arguments, from the artifact in `path`."""
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise UserError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    if not (0 <= args.temperature < float("inf") and args.top_k >= 0 and 0.0 < args.top_p <= 1.0):
        raise UserError("--temperature/--top-k/--top-p: sampling: temperature must be finite and >= 0 (0: greedy), "
                        "top_k >= 0, top_p in (0, 1]")
    manifest, backend = load_artifact(path, args.num_samples, args.driver)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UserError("--prompt: give at least one character")
    outs = generate(manifest, backend, [prompt] * args.num_samples, args.max_new_tokens, args.temperature,
                    args.top_k, args.top_p, args.seed)
    eos = manifest["eos_id"]
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} (step {manifest['step']}) ---")
        if len(new) and new[-1] == eos:
            new = new[:-1]
        print(tokenizer.decode(list(prompt) + list(new)))
    return 0

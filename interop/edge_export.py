"""`meshforge export RUN --format stablehlo|iree`: a run's model as three functions that run without meshforge.

    prefill(weights, tokens_BP, starts_B)           -> (logits_BV, cache)   prompts left-padded to P tokens
    decode(weights, token_B, cache, starts_B)       -> (logits_BV, cache)   one token per row, at the cache's slot
    pick(logits_BV, key, temperature, top_k, top_p) -> (token_B, key)       meshforge's sampling rule, traced

`weights` is a flat dict of arrays by parameter path (int8 '<path>.q' and float '<path>.scale' for a weight
quantized with --quantize int8, dequantized inside the functions); `cache` is the flat list of the KV-cache arrays;
`starts_B` is where each row's prompt begins after the padding. They are meshforge's own model and sampling code
traced by `jax.export`, so an artifact decodes exactly as `meshforge sample` does.

- stablehlo: serialized `jax.export` artifacts with a symbolic batch dimension: any batch, in any process that has
  jax (and nothing of meshforge or flax).
- iree: the same StableHLO compiled by IREE for a target (llvm-cpu for this host's CPU; vulkan-spirv, metal-spirv,
  cuda), one module per batch size (IREE 3.13 cannot compile the dynamic broadcasts of a symbolic batch): runs
  with the `iree-base-runtime` package alone, no JAX.

Beside them: weights.npz, the run's tokenizer.json and manifest.json (shapes, the cache layout, P, the cache's
slots, the vocabulary limit and end-of-sequence id). `meshforge run-exported` (interop/edge_runner.py) generates
text from an artifact.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from data.tokenize import eos_id
from interop.edge_runner import FORMAT_VERSION
from models.axes import PROJECTIONS
from models.quant import dequantize_weights, from_arrays, quantize_weights, to_arrays
from models.transformer import compute_dtype, init_cache
from optim.trainable import path_name
from parallel.errors import UserError
from train.generate import decode_logits, prefill_logits

IREE_TARGETS = ("llvm-cpu", "vulkan-spirv", "metal-spirv", "cuda")


@dataclasses.dataclass(frozen=True)
class EdgeOptions:
    batch_sizes: tuple[int, ...] = (1,)  # iree: one module per batch size
    target: str = "llvm-cpu"  # iree backend
    target_cpu: str = "host"  # llvm-cpu: the CPU the modules are compiled for (host: this one; generic: any x86-64)
    quantize: str = ""  # "" or "int8": int8 weights with per-channel scales
    quantize_targets: str = ""  # which weights --quantize quantizes: a regex over parameter paths ("": PROJECTIONS)
    prompt_len: int = 64  # P: prompts are left-padded to this many tokens
    max_len: int = 0  # cache slots: the prompt's P plus the tokens to generate (0: P + 256)

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError("--batch-sizes: give positive batch sizes, e.g. 1,8")
        if self.target not in IREE_TARGETS:
            raise UserError(f"--target {self.target!r}: not an IREE backend meshforge exports to; use one of "
                            f"{', '.join(IREE_TARGETS)}")
        if self.quantize not in ("", "int8"):
            raise UserError(f"--quantize {self.quantize!r}: only int8 is supported")
        try:
            re.compile(self.quantize_targets or PROJECTIONS)
        except re.error as e:
            raise UserError(f"--quantize-targets {self.quantize_targets!r}: not a regex ({e})") from None
        if self.prompt_len < 1 or (self.max_len and self.max_len <= self.prompt_len):
            raise UserError("--prompt-len must be >= 1 and --max-len larger than it")

    @property
    def slots(self) -> int:
        return self.max_len or self.prompt_len + 256


def pick_traced(logits_BV: jax.Array, key_data: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array, vocab_limit: int) -> tuple[jax.Array, jax.Array]:
    """train.generate.pick with the rule's numbers as arrays, so one compiled function serves every setting, and
    the key split as the decode loop splits it: (token_B, next key). Same tokens as pick (tests/test_edge.py)."""
    key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
    V = logits_BV.shape[-1]
    logits_BV = jnp.where(jnp.arange(V) < vocab_limit, logits_BV, -jnp.inf)

    def top_k_filter(x_BV):
        kth_B1 = jax.lax.dynamic_slice_in_dim(jnp.sort(x_BV, axis=-1)[:, ::-1],
                                              jnp.clip(jnp.minimum(top_k, vocab_limit), 1, V) - 1, 1, axis=1)
        return jnp.where(x_BV < kth_B1, -jnp.inf, x_BV)

    def top_p_filter(x_BV):
        sorted_BV = jnp.sort(x_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x_BV < cutoff_B1, -jnp.inf, x_BV)

    def sample(x_BV):
        x_BV = x_BV / temperature
        # conditionals, not selects: a runtime then sorts only for the filters in use (IREE: ~1 ms per sort call)
        x_BV = jax.lax.cond(top_k > 0, top_k_filter, lambda x: x, x_BV)
        x_BV = jax.lax.cond(top_p < 1.0, top_p_filter, lambda x: x, x_BV)
        return jax.random.categorical(sub, x_BV, axis=-1).astype(jnp.int32)

    greedy = lambda x_BV: jnp.argmax(x_BV, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(temperature == 0, greedy, sample, logits_BV), jax.random.key_data(key)


class EdgeFunctions:
    """prefill, decode and pick of one model, over flat stored weight arrays (see the module doc)."""

    def __init__(self, mdef, params: dict, opts: EdgeOptions, vocab_limit: int):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.names = [path_name(p) for p, _ in flat]
        self.dtypes = [v.dtype for _, v in flat]
        self.mdef, self.opts, self.vocab_limit = mdef, opts, vocab_limit
        self.cache_dtype = compute_dtype(mdef.cfg.dtype)
        self.cache_tree = jax.tree.structure(init_cache(mdef.cfg, 1, 1, self.cache_dtype))

    def _params(self, arrays: dict) -> dict:
        weights = dequantize_weights(from_arrays(arrays))
        # stored float32 (numpy has no bfloat16): back to the model's own parameter dtypes
        return jax.tree_util.tree_unflatten(self.treedef, [weights[n].astype(d) for n, d in zip(self.names,
                                                                                           self.dtypes)])

    def prefill(self, arrays, tokens_BP, starts_B):
        cache = init_cache(self.mdef.cfg, tokens_BP.shape[0], self.opts.slots, self.cache_dtype)
        logits_BV, cache = prefill_logits(self.mdef, self._params(arrays), tokens_BP, starts_B, cache)
        return logits_BV.astype(jnp.float32), jax.tree.leaves(cache)

    def decode(self, arrays, token_B, cache_leaves, starts_B):
        cache = jax.tree.unflatten(self.cache_tree, cache_leaves)
        logits_BV, cache = decode_logits(self.mdef, self._params(arrays), token_B, cache, starts_B)
        return logits_BV.astype(jnp.float32), jax.tree.leaves(cache)

    def pick(self, logits_BV, key_data, temperature, top_k, top_p):
        return pick_traced(logits_BV, key_data, temperature, top_k, top_p, self.vocab_limit)

    def specs(self, batch, arrays: dict) -> dict[str, tuple]:
        """Argument shapes of each function at `batch` (an int or a symbolic dimension)."""
        i32, f32 = jnp.int32, jnp.float32
        w = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
        # shapes as prefill makes them: a scanned model's cache is stacked by layer, its batch axis second
        cache = jax.tree.leaves(jax.eval_shape(lambda: init_cache(self.mdef.cfg, batch, self.opts.slots,
                                                                  self.cache_dtype)))
        B, V = (batch,), self.mdef.cfg.vocab_size
        s = jax.ShapeDtypeStruct
        return {"prefill": (w, s((batch, self.opts.prompt_len), i32), s(B, i32)),
                "decode": (w, s(B, i32), cache, s(B, i32)),
                "pick": (s((batch, V), f32), s((2,), jnp.uint32), s((), f32), s((), i32), s((), f32))}


def export_edge(run: Path, loaded, params: dict, out: Path, fmt: str, opts: EdgeOptions, say=print) -> dict:
    """Write the artifact of `fmt` for the run in `run`, loaded (train.restore.Loaded), with host `params` (LoRA
    merged)."""
    from jax import export

    if not loaded.cfg.model.causal:
        raise UserError("export: this run holds a bidirectional (masked-LM) model, which cannot generate text; "
                        "export a causal run")
    tokenizer = loaded.tokenizer
    fns = EdgeFunctions(loaded.mdef, params, opts, tokenizer.vocab_size)
    flat = {n: np.asarray(v, np.float32) if jnp.issubdtype(v.dtype, jnp.floating) else np.asarray(v)
            for n, v in zip(fns.names, jax.tree.leaves(params))}  # bfloat16 has no numpy (npz) type
    if opts.quantize:
        axes = dict(zip(fns.names, jax.tree.leaves(loaded.mdef.logical_axes(), is_leaf=lambda x: isinstance(x, tuple))))
        try:
            flat = quantize_weights(flat, axes, opts.quantize, opts.quantize_targets or None)
        except ValueError as e:
            raise UserError(f"--quantize-targets: {e}; paths look like {fns.names[0]}") from None
    arrays = to_arrays(flat)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "weights.npz", **arrays)
    modules, kept = {}, {}
    t0 = time.perf_counter()
    if fmt == "stablehlo":
        batch = export.symbolic_shape("b")[0]
        for name, spec in fns.specs(batch, arrays).items():
            exported = export.export(jax.jit(getattr(fns, name)), platforms=("cpu",))(*spec)
            (out / f"{name}.jaxexport").write_bytes(exported.serialize())
        modules = {name: f"{name}.jaxexport" for name in ("prefill", "decode", "pick")}
    else:
        compile_str = iree_compiler()
        for b in sorted(set(opts.batch_sizes)):
            for name, spec in fns.specs(b, arrays).items():
                exported = export.export(jax.jit(getattr(fns, name)), platforms=("cpu",))(*spec)
                text = exported.mlir_module()
                # the module takes only the arguments it uses (jax.export drops the others): the runner passes those
                kept[f"{name}_b{b}"] = sorted(exported.module_kept_var_idx)
                extra = [f"--iree-llvmcpu-target-cpu={opts.target_cpu}"] if opts.target == "llvm-cpu" else []
                try:
                    module = compile_str(text, target_backends=[opts.target], input_type="stablehlo",
                                         extra_args=extra)
                except Exception as e:  # noqa: BLE001 - the compiler's message, in one line
                    raise UserError(f"export --format iree --target {opts.target}: IREE could not compile {name} "
                                    f"at batch {b}: {str(e).strip().splitlines()[0][:300]}") from None
                (out / f"{name}_b{b}.vmfb").write_bytes(module)
                modules[f"{name}_b{b}"] = f"{name}_b{b}.vmfb"
            say(f"meshforge: compiled the IREE modules for batch {b} ({time.perf_counter() - t0:.1f}s)")
    (out / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    m = loaded.cfg.model
    manifest = {
        "format_version": FORMAT_VERSION, "format": fmt, "step": loaded.step, "name": loaded.cfg.name,
        "target": opts.target if fmt == "iree" else "jax",
        "target_cpu": opts.target_cpu if fmt == "iree" and opts.target == "llvm-cpu" else None,
        "batch_sizes": sorted(set(opts.batch_sizes)) if fmt == "iree" else "any",
        "quantize": opts.quantize or "none", "prompt_len": opts.prompt_len, "slots": opts.slots,
        "vocab_limit": tokenizer.vocab_size, "vocab_size": m.vocab_size, "eos_id": eos_id(tokenizer),
        "learned_positions": m.positions == "learned", "max_seq_len": m.max_seq_len,
        "weights": sorted(arrays), "cache": [[list(s.shape), str(s.dtype)] for s in fns.specs(1, arrays)["decode"][2]],
        "modules": modules, "kept_args": kept,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"step": loaded.step, "format": fmt, "out": str(out), "quantize": opts.quantize or "none",
            "bytes": sum(p.stat().st_size for p in out.iterdir())}


def iree_compiler():
    try:
        from iree.compiler import compile_str
    except ImportError:
        raise UserError("export --format iree needs the IREE compiler: pip install -e '.[edge]'") from None
    return compile_str

"""Assemble a run from its config: mesh, data, tokenizer, model definition, optimizer, shardings.

Everything here only reads and validates; nothing touches the workdir, so a bad config fails before any file of
an existing run could change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from data.loader import process_rows, to_global
from data.partition import federate
from data.pipeline import Pipeline, build_pipeline
from data.sources import check_field, source_kind
from models.attention import why_not_cudnn
from models.transformer import compute_dtype
from optim.chains import build_optimizer
from optim.outer import layered, replicated
from optim.privacy import check_installed as check_dp_installed
from optim.privacy import epsilons as epsilons_per_round
from optim.prune import PruneError
from optim.trainable import select
from parallel.errors import UserError
from parallel.hosts import StepFlags
from parallel.mesh import batch_divisor, batch_sharding, make_mesh
from train.config import Config
from train.diagnostics import check_every
from train.rounds import RoundPlan, make_round_step, round_plan
from train.state import ModelDef, State, model_def, state_shardings
from train.step import make_train_step

VOCAB_MULTIPLE = 64  # padded vocabularies shard evenly over tensor axes and keep matmul shapes aligned


@dataclasses.dataclass
class Setup:
    cfg: Config
    mesh: Mesh
    data: Pipeline
    mdef: ModelDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: State
    batch_sharding: NamedSharding
    flags: StepFlags
    rounds: RoundPlan | None = None  # training with replicas (outer section): who trains, bytes per sync

    def train_step(self):
        """The jitted train step with this run's shardings (train and bench run this one): (state, batch,
        flags) -> (state, metrics), flags from self.flags.array()."""
        cfg = self.cfg
        diagnostics = cfg.log.diagnostics_every
        if self.rounds is not None:
            return make_round_step(self.mdef, self.tx, self.schedule, self.rounds, accum_steps=cfg.optim.accum_steps,
                                   seed=cfg.train.seed, state_shardings=self.shardings,
                                   batch_sharding=self.batch_sharding, flags_sharding=self.flags.sharding,
                                   diagnostics=diagnostics)
        return make_train_step(self.mdef, self.tx, self.schedule, accum_steps=cfg.optim.accum_steps,
                               seed=cfg.train.seed, state_shardings=self.shardings,
                               batch_sharding=self.batch_sharding, flags_sharding=self.flags.sharding,
                               diagnostics=diagnostics)

    def host_metrics(self, step: int) -> dict:
        """Figures the host adds to each log row: communication and privacy of a run with replicas."""
        return self.rounds.host_metrics(step) if self.rounds is not None else {}

    def abstract_batch(self) -> dict:
        """Shapes, dtypes and shardings of a global train batch (one host batch is built to read them), so the
        step can be compiled and its memory checked before any state exists."""
        size = self.cfg.train.batch_size
        host = self.data.host_batch(0, process_rows(self.batch_sharding, size))
        return {k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype, sharding=self.batch_sharding)
                for k, v in host.items()}

    def batch_fn(self, edit: Callable[[int, dict], dict] | None = None) -> Callable[[int], dict]:
        """step -> the global train batch of that step, this host reading only its rows (`edit` may change the
        host rows first: fault injection)."""
        size, sharding = self.cfg.train.batch_size, self.batch_sharding
        rows = process_rows(sharding, size)

        def batch(step: int) -> dict:
            host = self.data.train_batch(step, rows)
            return to_global(edit(step, host) if edit else host, sharding, size)

        return batch


COMPILE_CACHE_BYTES = 4 * 2**30  # least recently used programs go beyond this


def use_compile_cache(path: str) -> None:
    """Keep compiled programs under `path` (train.compile_cache) for later runs; JAX_COMPILATION_CACHE_DIR wins.

    A subfolder per host CPU (model and instruction-set flags): a home folder shared by machines of different
    types never hands one of them code compiled for another's instructions. A folder that cannot be made costs
    only the cache: a warning, and the run compiles as usual.
    """
    if not path or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = ""
    identity = [ln for ln in cpu.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
    machine = hashlib.sha256("\n".join([platform.machine(), *identity]).encode()).hexdigest()[:12]
    folder = Path(path).expanduser() / machine
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"meshforge: warning: train.compile_cache {path}: cannot create it ({e.strerror}); compiling without "
              "a cache (give another folder, or \"\" to turn it off)", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # With a size limit JAX evicts the least recently used programs and locks each read, so two runs sharing the
    # folder never read a half-written entry.
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX's default keeps programs that took 1 s; a small model's evaluation step compiles in less on a CPU
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def compile_timed(jitted, *args):
    """(compiled, seconds): ahead-of-time compilation, so the first timed call is not the compile."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def resolve_model(cfg: Config, vocab_size: int) -> Config:
    m = cfg.model
    if m.dtype == "auto":  # record the compute dtype this platform gets (config.json, bench, MFU peak)
        m = dataclasses.replace(m, dtype=jnp.dtype(compute_dtype("auto")).name)
    # attention_impl "auto" stays in the config: each platform that loads the run resolves it for itself.
    if m.attention_impl == "cudnn" and (why := why_not_cudnn(compute_dtype(m.dtype), m.head_size)):
        raise UserError(f"model.attention_impl: {why}; use auto (cuDNN where it can) or xla")
    if m.vocab_size == 0:
        m = dataclasses.replace(m, vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    elif m.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                        "raise it or leave it 0 to follow the tokenizer")
    if cfg.train.seq_len > m.max_seq_len:
        if m.positions == "learned":
            raise UserError(f"train.seq_len ({cfg.train.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}) "
                            "with learned positions; raise model.max_seq_len")
        m = dataclasses.replace(m, max_seq_len=cfg.train.seq_len)
    return dataclasses.replace(cfg, model=m)


def check_replicas(cfg: Config, mesh: Mesh) -> None:
    """The outer section against the mesh, the data and pruning (before any data is read)."""
    oc, on_mesh = cfg.outer, mesh.shape["replica"]
    if on_mesh > 1 and not oc.replicas:
        raise UserError(f"mesh.replica: {on_mesh} needs outer.replicas (model copies that synchronise every "
                        "outer.inner_steps); for synchronous training use mesh.data")
    if oc.replicas % on_mesh:
        raise UserError(f"outer.replicas: {oc.replicas} replicas cannot be spread evenly over mesh.replica={on_mesh} "
                        f"device groups; use a multiple of {on_mesh}")
    if oc.replicas and cfg.prune.method != "none":
        raise UserError("prune.method: pruning with outer.replicas is not supported (each replica would choose its "
                        "own masks, and their mean is sparse under none of them); prune after, with init_from")
    if oc.clients and cfg.data.mode != "packed":
        raise UserError("outer.clients: federated clients need data.mode packed (data.sources or data.path); "
                        "windows mode reads one text stream")
    if oc.clients:
        sources = cfg.data.source_list()
        if cfg.data.objective == "sft" or any(source_kind(src.path) == "synthetic" for _, src in sources):
            raise UserError("outer.clients: federated clients partition file or generator sources; synthetic tasks "
                            "and sft examples have no fixed windows to split")
        if oc.partition == "source" and oc.clients != len(sources):
            raise UserError(f"outer.clients: the source partition makes one client per source; set outer.clients "
                            f"{len(sources)} (the mixture has {len(sources)} sources)")
        if oc.partition == "dirichlet" and oc.partition_key != "source":
            for key, src in sources:
                check_field(key, src, oc.partition_key, "outer.partition_key")
    if oc.private:
        check_dp_installed()


def check_batch(cfg: Config, mesh: Mesh) -> None:
    div = batch_divisor(mesh)
    size = f"data-parallel size {div}"
    if cfg.outer.replicas:  # each replica's rows split over its own data-parallel devices
        within = div // mesh.shape["replica"]
        div, size = within * cfg.outer.replicas, f"outer.replicas {cfg.outer.replicas} x data-parallel size " \
                                                  f"{within} per replica"
    per_step = cfg.optim.accum_steps * div
    if cfg.train.batch_size % per_step:
        what = f"{div} ({size})" if cfg.optim.accum_steps == 1 else \
            f"{per_step} (optim.accum_steps {cfg.optim.accum_steps} x {size})"
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by {what}; "
                        f"use a multiple of {per_step}")


def check_objective(cfg: Config) -> None:
    """A masked-LM objective needs a bidirectional model; next-token objectives need a causal one."""
    masked = cfg.data.objective == "masked"
    if masked == cfg.model.causal:
        fix = "a masked LM predicts each token from both sides" if masked else "it predicts each token from the left"
        raise UserError(f"model.causal: data.objective {cfg.data.objective!r} needs model.causal "
                        f"{str(not masked).lower()} ({fix}); set --model.causal {str(not masked).lower()}")


def build(cfg: Config, workdir: Path | None = None) -> Setup:
    check_objective(cfg)
    mesh = make_mesh(cfg.mesh)
    check_replicas(cfg, mesh)
    check_batch(cfg, mesh)
    check_every(cfg.log.diagnostics_every, cfg.train.log_every)
    tc = cfg.train
    data = build_pipeline(cfg.data, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed, workdir=workdir)
    cfg = resolve_model(cfg, data.tokenizer.vocab_size)
    mdef = model_def(cfg.model, cfg.train.trainable)
    tx, schedule = optimizer(cfg, mdef)
    if (why := cfg.prune.unreached(cfg.train.steps)) and jax.process_index() == 0:
        print(f"meshforge: warning: {why}", file=sys.stderr, flush=True)
    shardings = state_shardings(tx, mdef, mesh)
    rounds = None
    if cfg.outer.enabled:
        data, rounds = replica_data(cfg, data, tx, select(mdef.param_shapes(), mdef.trainable))
    return Setup(cfg, mesh, data, mdef, tx, schedule, shardings, batch_sharding(mesh), StepFlags(mesh), rounds)


def replica_data(cfg: Config, data: Pipeline, tx, shapes: dict) -> tuple[Pipeline, RoundPlan]:
    """With federated clients, the pipeline that serves each round's clients; and the plan of the rounds: each
    replica's weight in the mean per round, and the privacy spent after each round."""
    oc, tc = cfg.outer, cfg.train
    n_rounds = -(-tc.steps // oc.inner_steps)
    weights = None
    if oc.clients:
        data = federate(data, clients=oc.clients, per_round=oc.replicas, partition=oc.partition, alpha=oc.alpha,
                        key=oc.partition_key, seed=tc.seed, inner_steps=oc.inner_steps, batch_size=tc.batch_size)
        # under DP every client weighs the same: an example-weighted mean would let one client's weight (its
        # data size) scale its contribution past the clipping bound
        weights = data.clients.weights(n_rounds, by_examples=oc.weighting == "examples" and not oc.private)
    # (DP needs clients: OuterConfig refuses it without)
    epsilons = epsilons_per_round(oc.dp_noise, oc.replicas, oc.clients, n_rounds, oc.dp_delta) if oc.private else None
    return data, round_plan(tx, shapes, tc.steps, weights, epsilons, positions_per_step=tc.batch_size * tc.seq_len)


def optimizer(cfg: Config, mdef: ModelDef) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain of a run (optim and prune sections) and its learning-rate schedule."""
    try:
        axes = select(mdef.logical_axes(), mdef.trainable)
        mup = cfg.model.width_mult if cfg.model.parametrization == "mup" else None
        tx, schedule = build_optimizer(cfg.optim, cfg.train.steps, axes, cfg.prune, mup_width_mult=mup)
        if cfg.outer.enabled:
            tx = replicated(tx, cfg.outer, layered(axes), noise_secret() if cfg.outer.private else None)
        jax.eval_shape(tx.init, select(mdef.param_shapes(), mdef.trainable))  # pruning checks its shapes here
    except PruneError as e:
        raise UserError(str(e)) from None
    return tx, schedule


def noise_secret() -> np.ndarray:
    """Key data for DP noise from the OS's entropy, the same on every process (process 0's); a new run stores it
    in its state (a resumed run restores its own), and never in config.json."""
    secret = np.frombuffer(os.urandom(8), np.uint32).copy()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        secret = np.asarray(multihost_utils.broadcast_one_to_all(secret), np.uint32)
    return secret


def check_resumable(cfg: Config, workdir: Path) -> None:
    """Refuse to continue a run whose saved model differs in shape from the configured one."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved_cfg = json.loads(path.read_text())
    saved, now = saved_cfg.get("model", {}), dataclasses.asdict(cfg.model)
    shape_keys = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "positions", "norm", "mlp",
                  "tie_embeddings", "use_bias", "head_dim", "qkv_bias", "qk_norm", "lora_rank", "lora_targets",
                  "rope_scaling", "scan_layers", "param_dtype", "moe_experts", "moe_every", "moe_d_ff",
                  "parametrization", "mup_base_width"]  # muP: another model, and another optimizer-state structure
    if now["positions"] == "learned":
        shape_keys.append("max_seq_len")  # the position table's length
    diff = [f"model.{k}: {saved.get(k)} -> {now[k]}" for k in shape_keys if k in saved and saved[k] != now[k]]
    # The optimizer's state has another structure, and the saved tokenizer would silently win over a new one.
    # (pruning: the masks' pattern and which weights carry them; its schedule may change, but masks never regrow)
    # (outer: the state's structure, or which client trains which rows in which round)
    for section, key in (("optim", "name"), ("outer", "replicas"), ("outer", "fragments"), ("outer", "optimizer"),
                         ("outer", "clients"), ("outer", "partition"), ("outer", "alpha"), ("outer", "partition_key"),
                         ("prune", "method"), ("prune", "targets"), ("prune", "scope"),
                         ("prune", "n"), ("prune", "m"), ("data", "tokenizer"), ("train", "trainable")):
        old, new = saved_cfg.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if old is not None and old != new:
            diff.append(f"{section}.{key}: {old} -> {new}")
    if diff:
        raise UserError(f"{workdir} holds a run with a different model or setup ({'; '.join(diff)}); "
                        "use a new --workdir, the run's original settings, or --fresh to start over")

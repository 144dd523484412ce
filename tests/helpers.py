"""Small shared pieces for tests: a tiny model, a step runner on any mesh, a CLI runner."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax

from data.loader import process_rows, to_global
from models.transformer import ModelConfig
from optim.chains import OptimConfig, build_optimizer
from parallel.mesh import MeshConfig, batch_sharding, make_mesh
from parallel.rules import activate
from train.state import model_def, init_state, state_shardings
from train.step import make_train_step

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


def random_batches(n: int, batch: int, seq: int, vocab: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((batch, seq), np.float32)})
    return out


def mesh_for(**sizes):
    """A mesh over the first prod(sizes) devices; unnamed axes are 1."""
    n = int(np.prod(list(sizes.values()))) if sizes else 1
    cfg = MeshConfig(**{"data": 1, **sizes})
    return make_mesh(cfg, jax.devices()[:n])


def learnable_batches(n: int, batch: int, seq: int, vocab: int = 64, seed: int = 0) -> list[dict]:
    """Rows that count up by 7 (mod vocab) from a random start, 10% of tokens replaced at random: a pattern the
    tiny model learns within a few steps. Its gradients carry signal, unlike uniform random tokens, where Adam's
    normalised update amplifies float rounding in near-zero gradients into visible parameter noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = (rng.integers(0, vocab, size=(batch, 1)) + 7 * np.arange(seq + 1)) % vocab
        noise = rng.random(toks.shape) < 0.1
        toks = np.where(noise, rng.integers(0, vocab, size=toks.shape), toks).astype(np.int32)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((batch, seq), np.float32)})
    return out


@dataclasses.dataclass
class Run:
    """What a short training run leaves to compare: per-step losses and gradient norms, the final parameters."""
    losses: np.ndarray
    grad_norms: np.ndarray
    params: dict  # numpy leaves, gathered from whatever mesh the run used
    init_params: dict


def _train(mesh, batches, model, optim, steps_total, seed, tx_hook=None) -> tuple[dict, dict, list[dict]]:
    """(initial params as numpy, final state, per-step metrics as floats), one step per batch."""
    mdef = model_def(model)
    tx, schedule = build_optimizer(optim, steps_total, mdef.logical_axes())  # LAMB needs the stacked axes
    tx = tx_hook(tx) if tx_hook else tx
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        state = init_state(tx, mdef, shardings, seed)
        init_params = jax.tree.map(np.asarray, state["params"])
        bs = batch_sharding(mesh)
        step = make_train_step(mdef, tx, schedule, accum_steps=optim.accum_steps, seed=seed,
                               state_shardings=shardings, batch_sharding=bs)
        metrics = []
        for b in batches:
            n = len(b["inputs"])
            rows = process_rows(bs, n)
            state, m = step(state, to_global({k: v[rows] for k, v in b.items()}, bs, n))
            metrics.append({k: float(m[k]) for k in ("loss", "grad_norm")})
    return init_params, state, metrics


def train_run(mesh, batches, model=TINY, optim=OptimConfig(warmup_steps=2), steps_total=100, seed=0,
              tx_hook: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None) -> Run:
    """Train on `mesh`, one step per batch. tx_hook wraps the optimizer: tests inject known bugs with it."""
    init_params, state, metrics = _train(mesh, batches, model, optim, steps_total, seed, tx_hook)
    return Run(np.array([m["loss"] for m in metrics]), np.array([m["grad_norm"] for m in metrics]),
               jax.tree.map(np.asarray, state["params"]), init_params)


def train_losses(mesh, batches, model=TINY, optim=OptimConfig(warmup_steps=2), steps_total=100, seed=0,
                 return_state=False):
    _, state, metrics = _train(mesh, batches, model, optim, steps_total, seed)
    losses = [m["loss"] for m in metrics]
    return (losses, state) if return_state else losses


PARAMS_ATOL = 5e-5  # assert_runs_match's default for final parameters


def assert_runs_match(got: Run, want: Run, rtol: float = 1e-5, params_atol: float = PARAMS_ATOL) -> None:
    """Same losses and gradient norms step by step, and the same final parameters, within float32 noise.

    Losses alone cannot tell a gradient 8x too large from the right one under Adam, whose update m / sqrt(v) is
    nearly scale-free; the parameters carry what the loss hides (tests/test_equivalence.py shows it). Measured
    on 10 steps at lr 3e-3: mesh-to-mesh parameter noise ~2e-6, an 8x gradient moves them ~1e-3.
    """
    np.testing.assert_allclose(got.losses, want.losses, rtol=rtol, err_msg="losses")
    np.testing.assert_allclose(got.grad_norms, want.grad_norms, rtol=rtol, err_msg="grad_norm")
    flat_want = jax.tree_util.tree_flatten_with_path(want.params)[0]
    flat_got = jax.tree.leaves(got.params)
    assert len(flat_got) == len(flat_want), "parameter trees differ"
    for (path, w), g in zip(flat_want, flat_got):
        np.testing.assert_allclose(g, w, rtol=0, atol=params_atol, err_msg=f"params{jax.tree_util.keystr(path)}")


def cli_env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def meshforge(*args, devices: int = 1, cwd=None, timeout=600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `meshforge ARGS` to completion; env adds variables (MESHFORGE_FAULTS, ...) to cli_env(devices)."""
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True,
                          env={**cli_env(devices), **(env or {})}, cwd=cwd or REPO, timeout=timeout)


def start_meshforge(*args, devices: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start `meshforge ARGS` in the background (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO, text=True,
                            env={**cli_env(devices), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def free_port() -> int:
    """A TCP port nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_digest(path: Path) -> dict[str, str]:
    """File -> sha256 for every file under path: proves a failed start changed nothing."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def logged_losses(workdir: Path) -> dict[int, float]:
    """step -> training loss of every row of a run's metrics.jsonl that has one."""
    import json

    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoint_state(workdir: Path, step: int | None = None) -> dict:
    """A checkpoint's whole train state (latest unless `step`) on one device, as plain nested dicts: written by
    any mesh or number of processes. Orbax gives layer keys as strings ('0'), not the model's ints."""
    import orbax.checkpoint as ocp

    if step is None:
        step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    path = workdir / "checkpoints" / str(step) / "state"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        return ckpt.restore(path, target)

"""Small shared pieces for tests: a tiny model, a step runner on any mesh, a CLI runner."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

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


def train_losses(mesh, batches, model=TINY, optim=OptimConfig(warmup_steps=2), steps_total=100, seed=0,
                 return_state=False):
    mdef = model_def(model)
    tx, schedule = build_optimizer(optim, steps_total)
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        state = init_state(tx, mdef, shardings, seed)
        bs = batch_sharding(mesh)
        step = make_train_step(mdef, tx, schedule, accum_steps=optim.accum_steps, seed=seed,
                               state_shardings=shardings, batch_sharding=bs)
        losses = []
        for b in batches:
            n = len(b["inputs"])
            rows = process_rows(bs, n)
            state, m = step(state, to_global({k: v[rows] for k, v in b.items()}, bs, n))
            losses.append(float(m["loss"]))
    return (losses, state) if return_state else losses


def cli_env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def meshforge(*args, devices: int = 1, cwd=None, timeout=600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `meshforge ARGS` to completion; env adds variables (MESHFORGE_FAULTS, ...) to cli_env(devices)."""
    return subprocess.run([sys.executable, "-m", "train.cli", *map(str, args)], capture_output=True, text=True,
                          env={**cli_env(devices), **(env or {})}, cwd=cwd or REPO, timeout=timeout)


def start_meshforge(*args, devices: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start `meshforge ARGS` in the background (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "train.cli", *map(str, args)], cwd=REPO, text=True,
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

"""`meshforge bench EXPERIMENT --data-only`: how fast the data pipeline delivers an experiment's training batches.

Times the batches this process would feed its devices (all rows of the global batch in a single process) three
ways: built synchronously (`host_batch`: the loader's own cost), through `train_batch` as the training loop
calls it (with the background prefetch), and with the global `jax.Array` assembled on the devices as well.
Tokens are batch rows x seq_len per batch. Compare `loader_tokens_per_s` with the train step's tokens_per_s.
"""
from __future__ import annotations

import time


from data.loader import process_rows, to_global
from data.pipeline import build_pipeline
from parallel.mesh import batch_sharding, make_mesh
from train.config import Config
from train.setup import check_batch


def _rate(make, tokens_per_batch: int, seconds: float, warmup: int = 5) -> tuple[float, int]:
    for step in range(warmup):
        make(step)
    n, t0 = 0, time.perf_counter()
    while True:
        make(warmup + n)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 20:
            return tokens_per_batch * n / elapsed, n


def bench_data(cfg: Config, seconds: float = 3.0) -> dict:
    tc = cfg.train
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    t0 = time.perf_counter()
    data = build_pipeline(cfg.data, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    start_s = time.perf_counter() - t0
    sharding = batch_sharding(mesh)
    rows = process_rows(sharding, tc.batch_size)
    tokens = len(rows) * tc.seq_len
    out = {"experiment": cfg.name, "mode": cfg.data.mode, "objective": cfg.data.objective,
           "tokenizer": f"{data.tokenizer.kind} ({data.tokenizer.vocab_size} ids)", "batch_rows": int(len(rows)),
           "seq_len": tc.seq_len, "pipeline_start_s": round(start_s, 3)}
    rate, n = _rate(lambda s: data.host_batch(s, rows), tokens, seconds)
    out["loader_tokens_per_s_no_prefetch"] = round(rate)
    rate, n = _rate(lambda s: data.train_batch(s, rows), tokens, seconds)
    out["loader_tokens_per_s"] = round(rate)
    out["batches_timed"] = n
    out["ms_per_batch"] = round(1000 * tokens / rate, 4)
    rate, _ = _rate(lambda s: to_global(data.train_batch(s, rows), sharding, tc.batch_size), tokens, seconds)
    out["to_device_tokens_per_s"] = round(rate)
    data.close()
    return out


def format_table(result: dict) -> str:
    width = max(map(len, result))
    return "\n".join(f"{k:<{width}}  {v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{k:<{width}}  {v}" for k, v in result.items())


"""`meshforge bench` on 8 fake devices: the collectives each strategy must produce, memory, FLOPs and MFU."""
import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest

from data.config import DataConfig
from helpers import TINY, meshforge
from models.transformer import ModelConfig
from parallel.mesh import MeshConfig, batch_divisor
from train.accounting import PEAK_TFLOPS, matmul_params_per_token, mfu, table_peak, train_flops_per_token
from train.bench import bench
from train.config import Config, TrainConfig
from train.setup import build
from train.state import abstract_state

MOE = dataclasses.replace(TINY, moe_experts=4, moe_capacity_factor=0.0)


def _cfg(model: ModelConfig, **mesh) -> Config:
    return Config(model=dataclasses.replace(model, vocab_size=0), mesh=MeshConfig(**{"data": 1, **mesh}),
                  data=DataConfig(), train=TrainConfig(batch_size=16, seq_len=16), name="tiny")


@functools.cache  # each layout is compiled and timed once per test process
def _bench(model: ModelConfig, **mesh) -> dict:
    return bench(_cfg(model, **mesh), steps=2, warmup=1, show=False)


def _state_and_batch_bytes(model: ModelConfig, **mesh) -> tuple[int, int, int]:
    """Bytes of one device's shards of the train state (from the state's own shardings, not from XLA), of the
    whole state, and of one device's rows of a batch."""
    setup = build(_cfg(model, **mesh))
    leaves = jax.tree.leaves(abstract_state(setup.tx, setup.mdef, setup.shardings))
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    batch = setup.data.train_batch(0, np.arange(setup.cfg.train.batch_size))
    return per_device, whole, sum(v.nbytes for v in batch.values()) // batch_divisor(setup.mesh)


@pytest.fixture
def grad_bytes():
    return 4 * _bench(TINY, data=8)["params"]  # float32 gradients


def test_data_parallel_all_reduces_the_gradients(grad_bytes):
    c = _bench(TINY, data=8)["collectives"]
    assert c["all-reduce"]["count"] >= 1
    assert grad_bytes <= c["all-reduce"]["bytes"] <= 1.2 * grad_bytes  # the gradients, once (plus scalars)
    assert c["all-gather"]["count"] == c["reduce-scatter"]["count"] == c["all-to-all"]["count"] == 0


def test_fsdp_all_gathers_params_and_reduce_scatters_grads(grad_bytes):
    r = _bench(TINY, fsdp=8)
    c = r["collectives"]
    assert c["all-gather"]["count"] > 0 and c["all-gather"]["bytes"] >= 0.9 * grad_bytes  # params, gathered
    assert c["reduce-scatter"]["count"] > 0 and c["reduce-scatter"]["bytes"] >= 0.9 * grad_bytes  # gradients
    assert c["all-reduce"]["bytes"] < 0.05 * grad_bytes  # only scalars (loss, norms) are all-reduced
    # The embedding lookup hands each device its rows back with an all-to-all of activations (models/axes.py),
    # forward and backward; no parameter moves that way.
    assert c["all-to-all"]["count"] <= 2 and c["all-to-all"]["bytes"] < 0.1 * grad_bytes


def test_expert_parallel_uses_all_to_all():
    c = _bench(MOE, data=2, expert=4)["collectives"]
    assert c["all-to-all"]["count"] >= 4  # dispatch and combine, forward and backward
    assert c["all-gather"]["count"] == 0  # routing (top-k) stays batch-sharded


def test_report_fields_and_memory():
    r = _bench(TINY, fsdp=8)
    for key in ("compile_s", "step_ms_median", "step_ms_p10", "step_ms_p90", "tokens_per_s", "model_flops_per_token",
                "xla_flops_per_token", "achieved_tflops_per_device", "peak_tflops_per_device", "mfu"):
        assert r[key] is not None and r[key] > 0, key
    assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
    m = r["memory_per_device"]
    state, whole, batch = _state_and_batch_bytes(TINY, fsdp=8)
    assert state < whole / 4  # FSDP: each device holds about an eighth of the state
    # The step's arguments are this device's shards of the state plus its rows of the batch and its row of the
    # step flags (parallel.hosts.StepFlags: two int32).
    assert state <= m["arguments"] <= state + batch + 8
    assert m["temporaries"] > 0 and m["outputs"] >= 0.9 * state  # the new state comes back out
    assert m["peak"] >= m["arguments"] + m["temporaries"]  # arguments stay live while the step's temporaries are
    # XLA's count includes norms, softmax and the optimizer: near, but above, the matmul count.
    assert r["model_flops_per_token"] < r["xla_flops_per_token"] < 1.6 * r["model_flops_per_token"]
    fsdp_args = m["arguments"]
    assert _bench(TINY, data=8)["memory_per_device"]["arguments"] > 4 * fsdp_args  # FSDP shards the state


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=128, d_model=128, n_layers=4, n_heads=4)  # the shakespeare_char model
    per_layer = 4 * 128 * 128 + 2 * 128 * 512  # q, k, v, o + GELU MLP
    assert matmul_params_per_token(cfg) == 4 * per_layer + 128 * 128  # + the (tied) output head
    # Attention per token and layer, forward: q.k over T keys and the weighted sum of T values, each 2 x T x d_model
    # FLOPs; the backward pass is twice the forward: 3 x 4 x T x d_model = 12 x T x d_model with every key seen.
    # A causal model needs only the keys at or before the query, half the T x T square (MaxText's convention).
    full_attention = 3 * (2 * 64 * 128 + 2 * 64 * 128) * 4  # seq_len 64, d_model 128, 4 layers
    assert full_attention == 12 * 4 * 128 * 64
    six_n = 6 * (4 * per_layer + 128 * 128)
    assert train_flops_per_token(cfg, 64) == six_n + full_attention // 2  # causal is the default
    assert train_flops_per_token(dataclasses.replace(cfg, causal=False), 64) == six_n + full_attention
    moe = dataclasses.replace(cfg, moe_experts=4, moe_top_k=2, moe_d_ff=256, moe_every=2)
    moe_layer = 4 * 128 * 128 + 2 * (2 * 128 * 256) + 128 * 4  # top-2 experts of width 256, plus the router
    assert matmul_params_per_token(moe) == 2 * per_layer + 2 * moe_layer + 128 * 128


# Dense (no 2:4 sparsity) peak TFLOP/s per chip from the vendors' spec pages, typed in here rather than read from
# PEAK_TFLOPS: (bfloat16, float32 as JAX's DEFAULT precision runs it). NVIDIA: the A100 and H100/H200 datasheets
# (BF16 and TF32 Tensor Core, halved from the "with sparsity" figures: BF16 A100 624, H100 SXM and H200 1979, H100
# PCIe 1513; TF32 A100 312, H100 SXM and H200 989, H100 PCIe 756). Google Cloud TPU system architecture pages: bf16 per chip; DEFAULT float32 matmuls
# on TPU are one bfloat16 pass, so the same figure.
VENDOR_PEAK_TFLOPS = {
    "TPU v4": (275, 275),
    "TPU v5 lite": (197, 197),  # v5e as jax names it
    "TPU v5e": (197, 197),
    "TPU v5": (459, 459),  # v5p as jax names it
    "TPU v5p": (459, 459),
    "TPU v6 lite": (918, 918),  # v6e (Trillium) as jax names it
    "TPU v6e": (918, 918),
    "NVIDIA A100-SXM4-80GB": (312, 156),
    "NVIDIA A100-PCIE-40GB": (312, 156),
    "NVIDIA H100 PCIe": (756, 378),
    "NVIDIA H100 80GB HBM3": (989, 494.7),  # SXM
    "NVIDIA H200": (989, 494.7),
}


def test_peak_table_matches_vendor_figures():
    for kind, (bf16, fp32) in VENDOR_PEAK_TFLOPS.items():
        assert table_peak(kind, "bfloat16") == pytest.approx(bf16 * 1e12, rel=0.002), kind
        assert table_peak(kind, "float32") == pytest.approx(fp32 * 1e12, rel=0.002), kind
    for name, *_ in PEAK_TFLOPS:  # an entry with no vendor figure here would go unchecked
        assert any(name.lower() in kind.lower() for kind in VENDOR_PEAK_TFLOPS), name
    assert table_peak("cpu", "float32") is None


def test_mfu():
    assert mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, None, 2) is None


def test_bench_command_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = meshforge("bench", "experiments/shakespeare_char.py", "--model.d_model", "32", "--model.n_layers", "1",
                  "--model.n_heads", "2", "--train.seq_len", "16", "--train.batch_size", "4", "--steps", "3",
                  "--warmup", "1", "--json", out, devices=2)
    assert r.returncode == 0, r.stderr
    assert "MFU" in r.stdout and "all-reduce" in r.stdout
    result = json.loads(out.read_text())
    assert result["devices"] == 2 and result["steps_timed"] == 3 and 0 < result["mfu"] < 1
    bad = meshforge("bench", "experiments/shakespeare_char.py", "--steps", "0", devices=2)
    assert bad.returncode == 2 and "--steps" in bad.stderr


TORCH_CASES = {  # each feature the PyTorch reference mirrors, checked through equal parameter counts
    "rope gelu tied": TINY,
    "learned swiglu untied gqa": dataclasses.replace(TINY, positions="learned", mlp="swiglu", tie_embeddings=False,
                                                     n_kv_heads=1),
    "layernorm bias qkv-bias": dataclasses.replace(TINY, norm="layernorm", use_bias=True, qkv_bias=True),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_reference_is_the_same_model(case):
    pytest.importorskip("torch")
    from interop.torch_reference import TorchLM, count_params as torch_params
    from models.transformer import Transformer, count_params
    from flax import nnx

    model = dataclasses.replace(TORCH_CASES[case], vocab_size=64)
    assert torch_params(TorchLM(model)) == count_params(Transformer(model, rngs=nnx.Rngs(0)))


def test_compare_torch_times_both_on_the_first_batch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "compare.json"
    r = meshforge("bench", "experiments/shakespeare_char.py", "--compare", "torch", "--steps", "3", "--warmup", "1",
                  "--json", out, "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
                  "--train.seq_len", "16", "--train.batch_size", "4", devices=2)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["meshforge_params"] == res["torch_params"] and res["meshforge_devices"] == 2
    assert res["meshforge_step_ms"] > 0 and res["torch_step_ms"] > 0 and res["cpu"]
    assert res["torch_over_meshforge"] == pytest.approx(res["torch_step_ms"] / res["meshforge_step_ms"], rel=1e-2)
    # A fresh model is near uniform over the 128-row (padded) vocabulary on the real first batch: the reference
    # computes the experiment's loss, not a stand-in.
    assert abs(res["torch_first_loss"] - math.log(128)) < 0.3
    assert "PyTorch / meshforge" in r.stdout


def test_compare_train_runs_the_loop_between_two_benches(tmp_path):
    out = tmp_path / "loop.json"
    r = meshforge("bench", "experiments/shakespeare_char.py", "--compare", "train", "--steps", "3", "--warmup", "1",
                  "--json", out, "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
                  "--train.seq_len", "16", "--train.batch_size", "4", "--train.steps", "8", "--train.eval_every", "4",
                  "--train.eval_batches", "2", "--train.log_every", "4", devices=2)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["train_steps"] == 8 and res["train_evals"] == 2 and res["devices"] == 2
    assert res["bench_step_ms"] == pytest.approx((res["bench_step_ms_before"] + res["bench_step_ms_after"]) / 2,
                                                 rel=1e-3)
    assert res["train_over_bench"] == pytest.approx(res["train_step_ms"] / res["bench_step_ms"], rel=1e-2)
    assert 0 < res["train_eval_s"] < res["train_wall_s"] and res["train_compile_s"] < res["train_setup_s"]
    assert res["final_val_loss"] < 4.9 and "train / bench" in r.stdout


def test_compare_torch_refuses_what_the_reference_lacks():
    r = meshforge("bench", "experiments/shakespeare_char.py", "--compare", "torch", "--model.moe_experts", "4")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "model.moe_experts" in lines[0], r.stderr

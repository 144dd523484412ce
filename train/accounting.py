"""FLOPs per token, device peaks and model FLOPs utilisation (MFU): one definition for `bench` and `train`.

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s per device x devices). Model FLOPs count the
matmuls the model needs (PaLM, appendix B): 6 x active matmul parameters per token for forward + backward, plus
12 x layers x seq_len x (heads x head_dim) for attention scores and values over the full T x T, halved for a
causal model (MaxText's convention): a query needs only the keys before it, and fused kernels (cuDNN, splash)
skip the masked blocks, so counting the whole square would overstate MFU. Bidirectional models keep the full count.
Recomputation under remat and MoE dispatch einsums are extra hardware work, not model FLOPs; XLA's own count
(`cost_analysis`) includes them and is shown beside it by `bench`.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import ModelConfig
from train.hardware import CHIPS, chip_for_kind

# Dense peak TFLOP/s per chip, (device_kind substring, bfloat16, float32 at JAX's DEFAULT matmul precision), from
# the chip table (train/hardware.py). Checked in order: the first name contained in jax's device_kind wins.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = tuple(
    (kind, chip.bf16_tflops, chip.fp32_tflops) for chip in CHIPS for kind in chip.kinds)


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Matmul parameters one token passes through: all of a dense model's, only top_k experts' of an MoE
    layer (plus its router), and the output head. Embedding lookups are not matmuls."""
    head_dim = cfg.head_size
    attn = cfg.d_model * head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    n_in = 2 if cfg.mlp == "swiglu" else 1
    dense_mlp = (n_in + 1) * cfg.d_model * cfg.ff_dim
    moe_mlp = cfg.moe_top_k * (n_in + 1) * cfg.d_model * cfg.expert_ff_dim + cfg.d_model * cfg.moe_experts
    layers = sum(attn + (moe_mlp if cfg.is_moe_layer(i) else dense_mlp) for i in range(cfg.n_layers))
    return layers + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward and backward); causal attention counts half the T x T."""
    attention = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
    if cfg.causal:
        attention /= 2
    return 6.0 * matmul_params_per_token(cfg) + attention


def table_peak(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s per accelerator chip from the chip table, or None for a device it does not know (or a CPU)."""
    chip = chip_for_kind(device_kind, "accelerator")
    return 1e12 * (chip.bf16_tflops if dtype == "bfloat16" else chip.fp32_tflops) if chip else None


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(dtype: str, size: int = 512, repeats: int = 10) -> float:
    """Matmul FLOP/s per device, measured: every device multiplies size x size matrices at once (so virtual CPU
    devices compete for the cores as they do in training), best of `repeats`. Takes about 0.2 s."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()  # every process measures its own: no collective, no cross-host transfer
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    with jax.set_mesh(mesh):  # not the training mesh a caller may have set, which can span other hosts
        a = jax.device_put(np.ones((len(devices), size, size), jnp.dtype(dtype)), sharding)
        matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
        matmul(a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def device_peak(dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from) for the compute dtype on this host's devices."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak(dtype), "measured (matmul on every CPU device at once)"
    peak = table_peak(device.device_kind, dtype)
    return peak, ("table: " + device.device_kind) if peak else f"unknown device {device.device_kind!r}"


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float | None, n_devices: int) -> float | None:
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * n_devices)

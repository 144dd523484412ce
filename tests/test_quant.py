"""int8 quantization (models/quant.py): fake quantization for quantization-aware training and its rules."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY
from models.dense import dense
from models.transformer import ModelConfig, Transformer

pytest.importorskip("qwix")
from models.quant import fake_quant  # noqa: E402


def test_fake_quant_is_int8_per_channel_with_a_straight_through_gradient():
    w = jax.random.normal(jax.random.key(0), (16, 3, 8))
    q = np.asarray(fake_quant(w, (0,)))
    scale = np.abs(np.asarray(w)).max(axis=0, keepdims=True) / 127.5  # qwix's absmax: the largest maps to 127.5
    steps = q / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # a whole number of its channel's steps
    assert steps.min() >= -128.001 and steps.max() <= 127.001 and len(np.unique(np.round(steps))) > 100
    assert not np.allclose(q, w)
    c = jax.random.normal(jax.random.key(1), w.shape)
    np.testing.assert_array_equal(jax.grad(lambda w: (fake_quant(w, (0,)) * c).sum())(w), c)


@pytest.mark.parametrize("mode", ["int8_weights", "int8", "fp8"])
def test_qat_projection_computes_on_quantized_operands(mode):
    k = jax.random.split(jax.random.key(0), 2)
    x, w = jax.random.normal(k[0], (2, 5, 4, 8)), jax.random.normal(k[1], (4, 8, 16))  # n_in 2: wo_NHD's shape
    qtype = "float8_e4m3fn" if mode == "fp8" else "int8"
    xq = x if mode == "int8_weights" else fake_quant(x, (2, 3), qtype)
    want = dense(xq, fake_quant(w, (0, 1), qtype), 2)
    got = dense(x, w, 2, qat=mode)
    np.testing.assert_array_equal(got, want)
    assert float(jnp.abs(got - dense(x, w, 2)).max()) > 1e-3  # it did quantize


def test_qat_targets_choose_the_projections():
    cfg = dataclasses.replace(TINY, qat="int8", qat_targets="attn/wq|mlp/wo")
    block = Transformer(cfg, rngs=nnx.Rngs(0)).blocks[0]
    assert (block.attn.qat_q, block.attn.qat_kv, block.attn.qat_o) == ("int8", None, None)
    assert (block.mlp.qat_i, block.mlp.qat_o) == (None, "int8")
    tokens = jnp.zeros((2, 8), jnp.int32)
    plain = Transformer(TINY, rngs=nnx.Rngs(0))
    assert float(jnp.abs(Transformer(cfg, rngs=nnx.Rngs(0))(tokens) - plain(tokens)).max()) > 0
    with pytest.raises(ValueError, match="model.qat_targets"):
        ModelConfig(vocab_size=64, qat="int8", qat_targets="nothing")


def test_fp8_fake_quant_lands_on_e4m3_values():
    w = jax.random.normal(jax.random.key(2), (32, 8))
    q = np.asarray(fake_quant(w, (0,), "float8_e4m3fn"))
    scale = np.abs(np.asarray(w)).max(axis=0, keepdims=True) / 448  # e4m3's largest finite value
    on_grid = (q / scale).astype(jnp.float8_e4m3fn).astype(np.float32)
    np.testing.assert_allclose(q / scale, on_grid, rtol=1e-5, atol=1e-6)
    assert not np.allclose(q, w)

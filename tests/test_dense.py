"""models/dense.py: the CPU projection's custom gradient equals autodiff of the einsum, leaves no transposed copy
of the activation gradient in the compiled step, and stays visible to the "save_dots" remat policy."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.dense import dense
from models.transformer import REMAT_POLICIES

CASES = [  # (x shape, w shape, n_in): every projection the models make, both sides of the narrower-operand rule
    ((3, 8, 16), (16, 1, 48), 1),  # MLP in (GELU): D -> (1, F), wider output
    ((3, 8, 48), (48, 16), 1),  # MLP out: F -> D, wider input
    ((3, 8, 16), (16, 2, 2, 4), 1),  # fused k/v: D -> (2, K, H)
    ((3, 8, 4, 4), (4, 4, 16), 2),  # attention out: (N, H) -> D
    ((3, 8, 4, 8), (4, 8, 16), 2),  # attention out with N x H wider than D (Qwen3-style head_dim)
]


def _loss(f):
    # a nonlinear read-out, so every output element gets its own gradient
    return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * jnp.arange(1.0, 2.0, 1.0 / f(x, w).size).reshape(f(x, w).shape))


@pytest.mark.parametrize("xs,ws,n_in", CASES)
def test_value_and_gradients_equal_the_einsum(xs, ws, n_in):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    plain = lambda x, w: jnp.tensordot(x, w, axes=n_in)  # noqa: E731
    ours = lambda x, w: dense(x, w, n_in)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.grad(_loss(ours), (0, 1))(x, w), jax.grad(_loss(plain), (0, 1))(x, w)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float32_output_from_bfloat16_operands_keeps_the_operand_dtypes_in_the_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 8, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (16, 32)).astype(jnp.bfloat16)
    y = dense(x, w, 1, jnp.float32)
    assert y.dtype == jnp.float32  # the logits' case: float32 accumulation of bfloat16 operands
    dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, 1, jnp.float32))), (0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.tensordot(x, w, 1, preferred_element_type=jnp.float32))),
                   (0, 1))(x, w)
    np.testing.assert_allclose(np.float32(dw), np.float32(ref[1]), rtol=2e-2, atol=2e-2)


def test_no_transposed_copy_of_the_activation_gradient():
    """The weight gradient of an MLP-in projection never materialises the (F, B*T) transpose of its
    activation gradient: (64, 96) here, for 2 x 48 tokens of width 64. (The einsum's autodiff makes that copy with
    (batch, length) activations, as the models have, on jax 0.10-0.12.)"""
    x = jnp.ones((2, 48, 16))
    w = jnp.ones((16, 64))
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jax.nn.gelu(dense(x, w)) ** 2)))
    hlo = grad.lower(w, x).compile().as_text()
    assert "f32[16,64]" in hlo  # the gradient itself, in w's layout
    assert not re.search(r"f32\[64,96\]", hlo), "the activation gradient was transposed"


def test_save_dots_keeps_the_projection_outputs(capsys):
    def block(x, w1, w2):
        return jnp.sum(jnp.tanh(dense(jax.nn.gelu(dense(x, w1)), w2)))

    x, w1, w2 = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16, 8))
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(block, policy=REMAT_POLICIES["save_dots"]), x, w1, w2)
    saved = capsys.readouterr().out.splitlines()
    named = sorted(line.split()[0] for line in saved if "named 'dense'" in line)
    assert named == ["f32[4,16]", "f32[4,8]"], saved  # both matmul outputs kept: the backward recomputes neither

"""Projections x @ W, with a weight gradient that XLA's CPU backend computes without copying an activation.

JAX differentiates `einsum("btd,df->btf", x, w)` with respect to w as transpose(dot(g, x)): the activation
gradient g is the left operand contracted over its leading (batch) axes, and XLA's CPU backend first copies the
whole gradient into (F, B*T) order. At the sizes a CPU trains, that copy costs as much as the matmul (profiled on
a 2-core AMD EPYC: the four MLP copies were 15% of shakespeare_char's step). On a CPU `dense` computes the weight
gradient with the narrower of x and g transposed instead, and its product straight in W's layout. GPU and TPU
compilers pick the operand layouts of a matmul themselves, so there the plain einsum and its autodiff are kept.

The output is named "dense" for the remat policies (models/transformer.py): a custom gradient hides the
matmul from `dots_with_no_batch_dims_saveable`, and the name lets "save_dots" keep it all the same.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from models.quant import fake_quant


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype: jnp.dtype | None = None,
          qat: str | None = None) -> jax.Array:
    """x's last n_in axes contracted with w's first n_in: (..., I...) x (I..., O...) -> (..., O...).
    out_dtype: the matmul's accumulation and output dtype (None: the operands'). qat: what is fake-quantized for
    quantization-aware training (models/quant.py): "int8" and "fp8" weights and x, "int8_weights" or "int8_inputs"
    one of them."""
    if qat:
        qtype = "float8_e4m3fn" if qat == "fp8" else "int8"
        if qat != "int8_inputs":
            w = fake_quant(w, tuple(range(n_in)), qtype)
        if qat != "int8_weights":
            x = fake_quant(x, tuple(range(x.ndim - n_in, x.ndim)), qtype)
    if jax.default_backend() == "cpu":
        return checkpoint_name(_dense_cpu(x, w, n_in, out_dtype), "dense")
    return checkpoint_name(jnp.tensordot(x, w, axes=n_in, preferred_element_type=out_dtype), "dense")


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_cpu(x, w, n_in, out_dtype):
    return jnp.tensordot(x, w, axes=n_in, preferred_element_type=out_dtype)


def _dense_fwd(x, w, n_in, out_dtype):
    return _dense_cpu(x, w, n_in, out_dtype), (x, w)


def _dense_bwd(n_in, out_dtype, residuals, g):
    x, w = residuals
    lead, n_out = x.ndim - n_in, w.ndim - n_in
    batch, out_axes = tuple(range(lead)), tuple(range(lead, g.ndim))
    dx = jnp.tensordot(g, w, axes=(out_axes, tuple(range(n_in, w.ndim))), preferred_element_type=out_dtype)
    if math.prod(x.shape[lead:]) <= math.prod(g.shape[lead:]):
        dw = jnp.tensordot(x, g, axes=(batch, batch), preferred_element_type=out_dtype)
    else:  # x is the wider: transpose the narrower g, then the (weight-sized) product
        dw_OI = jnp.tensordot(g, x, axes=(batch, batch), preferred_element_type=out_dtype)
        dw = dw_OI.transpose(*range(n_out, n_out + n_in), *range(n_out))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_cpu.defvjp(_dense_fwd, _dense_bwd)

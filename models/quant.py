"""Quantization with qwix: int8 weights with one scale per output channel after training (PTQ), and the fake
quantization of quantization-aware training (`fake_quant`, used by models/dense.py).

A projection weight is quantized with `qwix.quantize` (absmax calibration) over the axes it contracts, keeping a
scale for every output channel and every stacked layer or expert; `qwix.dequantize` gives the float weight an int8
model computes with (weight-only quantization dequantizes before the matmul). Which weights: the parameters whose
path a regex finds (default: the attention and MLP projections, as pruning).

Weights travel as flat dicts keyed by path ('blocks/0/attn/wq_DNH'); a quantized weight is a qwix.QArray there,
and two arrays ('<path>.q' int8 and '<path>.scale') once stored (`to_arrays` / `from_arrays`).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.axes import PROJECTIONS, Axes, contracted_axes, path_name

def _qwix():
    try:
        import qwix
    except ImportError:
        raise ImportError("int8 quantization needs qwix: pip install -e '.[edge]'") from None
    return qwix


def _is_qarray(x) -> bool:
    """Without qwix installed nothing is quantized: float-only paths never need it."""
    try:
        import qwix
    except ImportError:
        return False
    return isinstance(x, qwix.QArray)


def quantize_weights(weights: dict[str, Any], axes: dict[str, Axes], qtype: str = "int8",
                     pattern: str | None = None) -> dict[str, Any]:
    """`weights` with every matrix whose path `pattern` (default PROJECTIONS) finds as a qwix.QArray
    (per-output-channel scales). Raises ValueError when the pattern finds none or is not a regex."""
    qwix = _qwix()
    pattern = pattern or PROJECTIONS
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a regex ({e})") from None
    out, found = {}, 0
    for name, w in weights.items():
        if regex.search(name) and np.ndim(w) >= 2:
            contracted = contracted_axes(axes[name])
            keep = tuple(i for i in range(np.ndim(w)) if i not in contracted)
            out[name] = qwix.quantize(jax.numpy.asarray(w), qtype, channelwise_axes=keep)
            found += 1
        else:
            out[name] = w
    if not found:
        raise ValueError(f"{pattern!r} matches no weight matrix")
    return out


def dequantize_weights(weights: dict[str, Any]) -> dict[str, jax.Array]:
    """Float weights from a dict holding qwix.QArrays (traceable: exported functions dequantize inside)."""
    return {k: _qwix().dequantize(v) if _is_qarray(v) else v for k, v in weights.items()}


def to_arrays(weights: dict[str, Any]) -> dict[str, np.ndarray]:
    """Plain arrays to store: a QArray becomes '<path>.q' and '<path>.scale'."""
    out = {}
    for k, v in weights.items():
        if _is_qarray(v):
            out[k + ".q"], out[k + ".scale"] = np.asarray(v.qvalue), np.asarray(v.scale)
        else:
            out[k] = np.asarray(v)
    return out


def from_arrays(arrays: dict[str, Any], qtype: str = "int8") -> dict[str, Any]:
    """The inverse of to_arrays (on numpy arrays or tracers)."""
    out = {}
    for k, v in arrays.items():
        if k.endswith(".scale"):
            continue
        if k.endswith(".q"):
            out[k[:-2]] = _qwix().QArray(v, arrays[k[:-2] + ".scale"], None, qtype)
        else:
            out[k] = v
    return out


def quantized_params(params: dict, logical_axes: dict, shardings: Any, qtype: str = "int8",
                     pattern: str | None = None) -> dict:
    """A nested param tree as a weight-only quantized model computes with it (quantize, then dequantize), placed
    with `shardings`: what `meshforge eval --quantize` evaluates."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(path) for path, _ in flat]
    axes = dict(zip(names, jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple))))
    weights = dequantize_weights(quantize_weights(dict(zip(names, (v for _, v in flat))), axes, qtype, pattern))
    return jax.device_put(jax.tree_util.tree_unflatten(treedef, [weights[n] for n in names]), shardings)


def fake_quant(x: jax.Array, contracted: tuple[int, ...], qtype: str = "int8") -> jax.Array:
    """x as `qtype` (int8, float8_e4m3fn) represents it (qwix's absmax scale, one per slice over the `contracted`
    axes: per output channel for a weight, per token for an input), with the gradient of the identity
    (straight-through estimator). Computed in float32 whatever x's dtype (a bfloat16 grid is not int8's).

    int8 values are rounded and clipped to [-128, 127] in float, never cast: qwix's scale maps a slice's largest
    value to 127.5, which rounds to 128, and an int8 cast of 128 saturates under XLA but wraps to -128 under IREE
    (the same export then flipped the sign of every channel's largest weight). PTQ (quantize_weights) casts on the
    host under XLA, so both give the same grid."""
    qwix = _qwix()
    keep = tuple(i for i in range(x.ndim) if i not in contracted)
    x32 = x.astype(jnp.float32)
    if qtype == "int8":
        scale = qwix.quantize(x32, qtype, channelwise_axes=keep).scale
        q = jnp.clip(jnp.round(x32 / scale), -128, 127) * scale
    else:
        q = qwix.dequantize(qwix.quantize(x32, qtype, channelwise_axes=keep))
    return x + jax.lax.stop_gradient(q.astype(x.dtype) - x)

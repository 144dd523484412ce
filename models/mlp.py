"""Position-wise feed-forward block: GELU (tanh approximation by default) or SwiGLU."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.axes import constrain, param
from models.dense import dense
from models.lora import LoRA


def hidden_activation(x: jax.Array, gate: jax.Array | None, kind: str, gelu_approximate: bool) -> jax.Array:
    """The MLP's nonlinearity on its first input projection: silu(x) * gate for swiglu, else gelu(x). Dense and
    expert MLPs share it."""
    if kind == "swiglu":
        return jax.nn.silu(x) * gate
    return jax.nn.gelu(x, approximate=gelu_approximate)


class MLP(nnx.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        kind: Literal["gelu", "swiglu"],
        gelu_approximate: bool,
        use_bias: bool,
        init_std: float,
        out_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype = jnp.float32,
        lora: Callable[[str, tuple[int, ...]], LoRA | None] | None = None,
        qat: Callable[[str], str | None] | None = None,
        rngs: nnx.Rngs,
    ):
        self.kind, self.gelu_approximate, self.use_bias, self.dtype = kind, gelu_approximate, use_bias, dtype
        qat = qat or (lambda name: None)
        self.qat_i, self.qat_o = qat("mlp/wi_DCF"), qat("mlp/wo_FD")
        init = jax.nn.initializers.normal(init_std)
        # SwiGLU's gate and up projections are one matmul with a leading axis of 2.
        n_in = 2 if kind == "swiglu" else 1
        pd = param_dtype
        self.wi_DCF = param(rngs, init, (d_model, n_in, d_ff), ("embed", None, "mlp"), pd)
        self.wo_FD = param(rngs, jax.nn.initializers.normal(out_std), (d_ff, d_model), ("mlp", "embed"), pd)
        if use_bias:
            self.bi_CF = param(rngs, jax.nn.initializers.zeros, (n_in, d_ff), (None, "mlp"), pd)
            self.bo_D = param(rngs, jax.nn.initializers.zeros, (d_model,), ("embed",), pd)
        lora = lora or (lambda name, shape: None)
        self.wi_DCF_lora = lora("mlp/wi_DCF", self.wi_DCF.shape)
        self.wo_FD_lora = lora("mlp/wo_FD", self.wo_FD.shape)

    def __call__(self, x_BTD: jax.Array, key: jax.Array | None = None) -> jax.Array:
        dt = self.dtype
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x_BTD = x_BTD.astype(dt)
        h_BTCF = dense(x_BTD, self.wi_DCF[...].astype(dt), qat=self.qat_i)
        if self.wi_DCF_lora is not None:
            h_BTCF = h_BTCF + self.wi_DCF_lora(x_BTD, k1)
        if self.use_bias:
            h_BTCF = h_BTCF + self.bi_CF[...].astype(dt)
        h_BTF = hidden_activation(h_BTCF[:, :, 0], h_BTCF[:, :, 1] if self.kind == "swiglu" else None, self.kind,
                         self.gelu_approximate)
        h_BTF = constrain(h_BTF, ("batch", "length", "act_mlp"))
        out_BTD = dense(h_BTF, self.wo_FD[...].astype(dt), qat=self.qat_o)
        if self.wo_FD_lora is not None:
            out_BTD = out_BTD + self.wo_FD_lora(h_BTF, k2)
        if self.use_bias:
            out_BTD = out_BTD + self.bo_D[...].astype(dt)
        return out_BTD

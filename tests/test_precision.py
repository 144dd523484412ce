"""Mixed precision: bfloat16 compute tracks float32 training; bfloat16 moments and parameters are what they say."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, mesh_for, random_batches, train_losses
from optim.chains import OptimConfig

OPTIM = OptimConfig(lr=1e-2, warmup_steps=2)


@pytest.fixture(scope="module")
def batches():
    return random_batches(2, batch=16, seq=16) * 10  # 20 steps over 2 batches: the loss falls steadily


@pytest.fixture(scope="module")
def float32_losses(batches):
    return train_losses(mesh_for(data=2), batches, optim=OPTIM)


def test_bfloat16_compute_tracks_float32(batches, float32_losses):
    bf16 = train_losses(mesh_for(data=2), batches, model=dataclasses.replace(TINY, dtype="bfloat16"), optim=OPTIM)
    assert float32_losses[-1] < 0.9 * float32_losses[0]
    np.testing.assert_allclose(bf16, float32_losses, rtol=0.005)  # measured: 4e-4
    assert bf16 != float32_losses  # it really ran in bfloat16


def test_bfloat16_moments_track_float32(batches, float32_losses):
    optim = dataclasses.replace(OPTIM, moment_dtype="bfloat16")
    losses, state = train_losses(mesh_for(data=2), batches, optim=optim, return_state=True)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    np.testing.assert_allclose(losses, float32_losses, rtol=0.002)  # measured: 1e-4


def test_bfloat16_parameters(batches, float32_losses):
    model = dataclasses.replace(TINY, param_dtype="bfloat16", dtype="bfloat16")
    losses, state = train_losses(mesh_for(data=2), batches, model=model, optim=OPTIM, return_state=True)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state["params"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]
    np.testing.assert_allclose(losses, float32_losses, rtol=0.03)  # pure bfloat16 updates are coarser (8e-3)


def _numpy_attention(x_BTD, wq_DNH, wkv_D2KH, wo_NHD, seg_BT, causal):
    """Masked softmax attention with grouped-query heads in float64 NumPy: the independent reference."""
    x_BTD, wq_DNH, wkv_D2KH, wo_NHD = (np.asarray(a, np.float64) for a in (x_BTD, wq_DNH, wkv_D2KH, wo_NHD))
    T, (N, H), K = x_BTD.shape[1], wq_DNH.shape[1:], wkv_D2KH.shape[2]
    q_BTNH = np.einsum("btd,dnh->btnh", x_BTD, wq_DNH)
    kv_BT2KH = np.einsum("btd,dskh->btskh", x_BTD, wkv_D2KH)
    k_BTNH, v_BTNH = (np.repeat(kv_BT2KH[:, :, i], N // K, axis=2) for i in (0, 1))  # query head n: kv head n//(N/K)
    scores_BNTS = np.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH) / np.sqrt(H)
    allowed_B11TS = (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    if causal:
        allowed_B11TS = allowed_B11TS & np.tril(np.ones((T, T), bool))
    scores_BNTS = np.where(allowed_B11TS, scores_BNTS, -np.inf)
    p_BNTS = np.exp(scores_BNTS - scores_BNTS.max(-1, keepdims=True))
    p_BNTS /= p_BNTS.sum(-1, keepdims=True)
    out_BTNH = np.einsum("bnts,bsnh->btnh", p_BNTS, v_BTNH)
    return np.einsum("btnh,nhd->btd", out_BTNH, wo_NHD)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_attention_matches_numpy(dtype):
    """attention_impl "auto" against NumPy, not against "xla" (on CPU "auto" is XLA, so that would compare XLA
    with itself). On a GPU in bfloat16 "auto" is cuDNN, checked against the same reference."""
    from flax import nnx

    from models.attention import Attention, segment_mask

    B, T, D, N, K = 2, 16, 64, 4, 2  # head_dim 16: cuDNN's kernel applies on a GPU in bfloat16
    on_gpu = jax.default_backend() == "gpu"
    x_BTD = jax.random.normal(jax.random.key(0), (B, T, D)).astype(dtype)  # rounded once, as the module would
    seg_BT = np.array([[0] * 5 + [1] * 11, [0] * 16])
    for causal in (True, False):
        attn = Attention(D, N, K, D // N, use_bias=False, init_std=0.3, out_std=0.3, implementation="auto",
                         dtype=jnp.dtype(dtype), causal=causal, rngs=nnx.Rngs(1))
        assert attn.implementation == ("cudnn" if on_gpu and dtype == "bfloat16" else "xla")
        weights = [w[...].astype(dtype) for w in (attn.wq_DNH, attn.wkv_D2KH, attn.wo_NHD)]  # what the matmuls see
        ref_BTD = _numpy_attention(x_BTD.astype(jnp.float32), *(w.astype(jnp.float32) for w in weights), seg_BT,
                                   causal)
        out_BTD = np.asarray(attn(x_BTD, segment_mask(jnp.asarray(seg_BT)), None), np.float64)
        # bfloat16 rounds q, k, v, the probabilities and the output (8 bits of mantissa): measured 0.9% of its scale.
        tol = 1e-5 if dtype == "float32" else 3e-2
        np.testing.assert_allclose(out_BTD, ref_BTD, atol=tol * np.abs(ref_BTD).max(), rtol=0)

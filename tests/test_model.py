"""Transformer behaviour: a NumPy forward, causality, document masking, attention, scan == loop, remat == no remat,
the sharded embedding lookup, budget."""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, mesh_for
from models.transformer import ModelConfig, Transformer, count_params


def _model(**kw):
    return Transformer(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def _perturbed(m, seed=0, scale=0.2):
    """The model with every parameter moved by N(0, scale): norms' scales leave 1 and attention leaves uniform,
    so a wrong norm, rotation or mask changes the output by much more than the tolerance."""
    state = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    params = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.unflatten(tree, moved))
    nnx.update(m, params)
    return m


def numpy_forward(cfg: ModelConfig, params: dict, tokens_BT: np.ndarray) -> np.ndarray:
    """Float64 logits of the dense rope / rmsnorm / gelu-tanh / tied-embedding decoder, written from the math,
    not from the model code: x = E[tokens]; per layer x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)); logits =
    RMSNorm(x) E^T. Attention is causal softmax(q k^T / sqrt(H)) v with rotary q, k (pairs i, i + H/2 rotated by
    position * theta^(-2i/H)) and query head n reading key/value head n // (N / K)."""
    assert cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "gelu" and cfg.tie_embeddings
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, T = tokens_BT.shape
    N, K, H = cfg.n_heads, cfg.kv_heads, cfg.d_model // cfg.n_heads

    def rmsnorm(x, scale):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * scale

    def rotate(x_BTNH):
        freq = cfg.rope_theta ** (-np.arange(0, H, 2) / H)
        angle = np.arange(T)[:, None] * freq  # (T, H/2)
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        a, b = x_BTNH[..., : H // 2], x_BTNH[..., H // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = p["embed_VD"][tokens_BT]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg.n_layers):
        blk = p["blocks"][i]
        h = rmsnorm(x, blk["attn_norm"]["scale_D"])
        q = rotate(np.einsum("btd,dnh->btnh", h, blk["attn"]["wq_DNH"]))
        kv = np.einsum("btd,dskh->btskh", h, blk["attn"]["wkv_D2KH"])
        k = rotate(kv[:, :, 0])[:, :, np.arange(N) // (N // K)]
        v = kv[:, :, 1][:, :, np.arange(N) // (N // K)]
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        s = np.where(causal, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("bnts,bsnh,nhd->btd", a, v, blk["attn"]["wo_NHD"])
        h = rmsnorm(x, blk["mlp_norm"]["scale_D"])
        x = x + gelu_tanh(h @ blk["mlp"]["wi_DCF"][:, 0]) @ blk["mlp"]["wo_FD"]
    return rmsnorm(x, p["final_norm"]["scale_D"]) @ p["embed_VD"].T


@pytest.mark.parametrize("kw", [{}, dict(n_kv_heads=2)])
def test_forward_matches_numpy(kw):
    m = _perturbed(_model(dtype="float32", **kw))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, 64))
    ref = numpy_forward(m.cfg, nnx.to_pure_dict(nnx.state(m, nnx.Param)), toks)
    assert ref.std() > 0.5  # logits far from zero: the tolerance below is tight
    np.testing.assert_allclose(m(toks), ref, atol=1e-5, rtol=1e-5)


def test_shakespeare_budget_matches_nanogpt():
    # nanoGPT's baby GPT: 4 layers x 12 * 128^2, plus a 65 x 128 token embedding (it does not count positions).
    nanogpt = 4 * 12 * 128 ** 2 + 65 * 128
    from experiments.shakespeare_char import get_config

    cfg = dataclasses.replace(get_config().model, vocab_size=128)  # the run pads the 65 characters to 128
    n = count_params(Transformer(cfg, rngs=nnx.Rngs(0)))
    assert abs(n - nanogpt) / nanogpt < 0.10, (n, nanogpt)


@pytest.mark.parametrize("kw", [{}, dict(positions="learned", mlp="swiglu", n_kv_heads=2, norm="layernorm")])
def test_causal(kw):
    m = _model(**kw)
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    changed = toks.at[:, 10:].set((toks[:, 10:] + 1) % 64)
    a, b = m(toks), m(changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_segments_isolate_documents():
    """A document's outputs do not change when a different document is packed before it."""
    m = _model()
    doc = jax.random.randint(jax.random.key(2), (1, 8), 0, 64)
    other1 = jax.random.randint(jax.random.key(3), (1, 8), 0, 64)
    other2 = jax.random.randint(jax.random.key(4), (1, 8), 0, 64)
    seg = jnp.array([[0] * 8 + [1] * 8])
    pos = jnp.array([list(range(8)) * 2])
    out1 = m(jnp.concatenate([other1, doc], 1), segment_ids_BT=seg, positions_BT=pos)
    out2 = m(jnp.concatenate([other2, doc], 1), segment_ids_BT=seg, positions_BT=pos)
    alone = m(doc)
    np.testing.assert_allclose(out1[:, 8:], out2[:, 8:], atol=1e-5)
    np.testing.assert_allclose(out1[:, 8:], alone, atol=1e-5)
    unmasked = m(jnp.concatenate([other1, doc], 1), positions_BT=pos)
    assert not np.allclose(unmasked[:, 8:], alone, atol=1e-3)


def test_scan_equals_loop():
    loop = _model()
    scan = _model(scan_layers=True)
    loop_state = nnx.to_pure_dict(nnx.state(loop))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[loop_state["blocks"][i] for i in range(TINY.n_layers)])
    scan_state = nnx.state(scan)
    nnx.replace_by_pure_dict(scan_state, {**loop_state, "blocks": stacked})
    nnx.update(scan, scan_state)
    toks = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)
    np.testing.assert_allclose(loop(toks), scan(toks), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_block_inputs"])
def test_remat_keeps_gradients(remat):
    toks = jax.random.randint(jax.random.key(6), (2, 16), 0, 64)
    grads = []
    for policy in ("none", remat):
        m = _model(remat=policy, scan_layers=True)
        grads.append(nnx.grad(lambda m: m(toks).mean())(m))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_attention_matches_a_plain_softmax_reference():
    """models.attention.Attention (is_causal plus the document mask, grouped-query heads) equals masked softmax
    attention by hand, for each selectable implementation that runs here: "xla", and "auto" as the module
    resolves it with pick_implementation (XLA in float32 on every backend; cuDNN is tested on a GPU below)."""
    from models.attention import Attention, pick_implementation, segment_mask

    B, T, D, N, K = 2, 8, 64, 4, 2
    H = D // N
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    allowed = jnp.tril(jnp.ones((T, T), bool))[None, None] & segment_mask(seg)
    for impl in ("xla", "auto"):
        attn = Attention(D, N, K, D // N, use_bias=False, init_std=0.3, out_std=0.3, implementation=impl, dtype=jnp.float32,
                         rngs=nnx.Rngs(1))
        assert attn.implementation == pick_implementation(impl, jnp.float32, H) == "xla"
        q = jnp.einsum("btd,dnh->btnh", x, attn.wq_DNH[...])
        kv = jnp.einsum("btd,dskh->btskh", x, attn.wkv_D2KH[...])
        k, v = (jnp.repeat(kv[:, :, i], N // K, axis=2) for i in (0, 1))  # query head n reads kv head n // (N/K)
        scores = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(H)
        ref = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), -1), v)
        ref = jnp.einsum("btnh,nhd->btd", ref, attn.wo_NHD[...])
        np.testing.assert_allclose(attn(x, segment_mask(seg), None), ref, atol=1e-5)


def test_attention_impl_auto_runs_and_matches_xla():
    from models.attention import pick_implementation

    toks = jax.random.randint(jax.random.key(7), (2, 16), 0, 64)
    auto = _perturbed(_model(attention_impl="auto", dtype="float32"))
    ref = numpy_forward(auto.cfg, nnx.to_pure_dict(nnx.state(auto, nnx.Param)), np.asarray(toks))
    np.testing.assert_allclose(auto(toks), ref, atol=1e-5, rtol=1e-5)
    on_gpu = jax.default_backend() == "gpu"
    # What the built model's attention layers really run, not only what pick_implementation says.
    assert {b.attn.implementation for b in auto.blocks} == {"xla"}
    bf16 = _model(attention_impl="auto", dtype="bfloat16")  # head_dim 8: cuDNN's kernel applies on a GPU
    assert {b.attn.implementation for b in bf16.blocks} == {"cudnn" if on_gpu else "xla"}
    assert {b.attn.implementation for b in _model(attention_impl="xla", dtype="bfloat16").blocks} == {"xla"}
    assert pick_implementation("auto", jnp.bfloat16, 64) == ("cudnn" if on_gpu else "xla")
    assert pick_implementation("auto", jnp.float32, 64) == "xla"  # cuDNN's kernel is for 16-bit inputs
    assert pick_implementation("auto", jnp.bfloat16, 256) == "xla"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla_with_documents():
    """What "auto" picks on a GPU: the fused kernel keeps causality and document boundaries, forward and backward."""
    from models.attention import segment_mask

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 256, 4, 64), jnp.bfloat16) for i in range(3))
    seg = jnp.array([[0] * 100 + [1] * 100 + [2] * 56, [0] * 256])
    w = jax.random.normal(jax.random.key(9), (2, 256, 4, 64), jnp.float32)

    def run(impl):
        def f(q, k, v):
            out = jax.nn.dot_product_attention(q, k, v, mask=segment_mask(seg), is_causal=True, implementation=impl)
            return (out.astype(jnp.float32) * w).sum(), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [x.astype(jnp.float32) for x in (out, *grads)]

    for a, b in zip(run("cudnn"), run("xla")):
        np.testing.assert_allclose(a, b, atol=0.05, rtol=0.05)


def test_moe_scan_equals_loop():
    """Dense and MoE layers alternating (moe_every=2): the scanned LayerGroup stack equals the plain loop."""
    kw = dict(moe_experts=4, moe_every=2, moe_capacity_factor=0.0, n_layers=4)
    loop, scan = _model(**kw), _model(scan_layers=True, **kw)
    loop_state = nnx.to_pure_dict(nnx.state(loop))
    groups = [{"layers": {0: loop_state["blocks"][2 * g], 1: loop_state["blocks"][2 * g + 1]}} for g in range(2)]
    scan_state = nnx.state(scan)
    nnx.replace_by_pure_dict(scan_state, {**loop_state, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *groups)})
    nnx.update(scan, scan_state)
    toks = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)
    (a, aux_a), (b, aux_b) = loop(toks, return_aux=True), scan(toks, return_aux=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    for key in aux_a:
        np.testing.assert_allclose(aux_a[key], aux_b[key], rtol=1e-5, atol=1e-7)


def test_dropout_is_active_only_with_a_key():
    m = _perturbed(_model(dropout=0.5, dtype="float32"))
    toks = jnp.zeros((1, 16), jnp.int32)
    ref = numpy_forward(m.cfg, nnx.to_pure_dict(nnx.state(m, nnx.Param)), np.asarray(toks))  # no dropout in it
    np.testing.assert_allclose(m(toks), ref, atol=1e-5, rtol=1e-5)
    assert not np.allclose(m(toks, dropout_key=jax.random.key(0)), m(toks, dropout_key=jax.random.key(1)))


def test_bfloat16_compute_keeps_float32_logits_and_params():
    m = _model(dtype="bfloat16")
    out = m(jnp.zeros((1, 16), jnp.int32))
    assert out.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)


def _table_gathers(hlo: str, V: int, n_devices: int) -> list[str]:
    """All-gathers whose result holds rows of a (V, ...) table: V / k of them for k up to the device count."""
    rows = {V // k for k in range(1, n_devices + 1) if V % k == 0}
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            found += [a for a, dims in re.findall(r"((?:f|bf)\d+\[([\d,]+)\])", m.group(1))
                      if int(dims.split(",")[0]) in rows]
    return found


@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(tensor=8), dict(fsdp=4, tensor=2),
                                   dict(data=2, fsdp=2, tensor=2)])
def test_embedding_lookup_never_gathers_the_table(sizes):
    """Under FSDP and tensor parallelism the lookup moves tokens and activations, never rows of the (V, D) table,
    forward or backward; and it gives the single-device loss and gradient. (Untied head: the tied head's matmul
    gathers its weight like every FSDP matmul does.)"""
    from parallel.mesh import batch_sharding
    from parallel.rules import activate
    from train.state import model_def, param_shardings

    # 520 rows: no other parameter has 520 / k rows (k <= 8), so a gathered table is told apart by its shape.
    cfg = dataclasses.replace(TINY, vocab_size=520, n_heads=8, tie_embeddings=False, dtype="float32")
    mdef = model_def(cfg)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), mdef.param_shapes())
    toks = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    w = rng.normal(size=(8, 16, cfg.vocab_size)).astype(np.float32)

    def loss(params, toks):
        return (mdef.apply(params, toks) * w).sum()

    ref_loss, ref_grads = jax.value_and_grad(loss)(params, toks)
    mesh = mesh_for(**sizes)
    with activate(mesh):
        step = jax.jit(jax.value_and_grad(loss), in_shardings=(param_shardings(mdef, mesh), batch_sharding(mesh)))
        hlo = step.lower(params, toks).compile().as_text()
        got_loss, got_grads = step(params, toks)
    assert not _table_gathers(hlo, cfg.vocab_size, 8), _table_gathers(hlo, cfg.vocab_size, 8)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    # Gradients of magnitude ~10 summed in another order: float32 rounding, far below a misplaced row's O(1).
    np.testing.assert_allclose(got_grads["embed_VD"], ref_grads["embed_VD"], rtol=1e-5, atol=5e-5)

"""The train step's cross-entropy: memory-bounded at a large vocabulary, and equal to the plain (B, T, V) form."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import ModelConfig
from train.state import model_def
from train.step import _forward_sums

# A Llama-3-sized vocabulary at batch 8 x 2048: float32 logits alone would be 8 * 2048 * 131072 * 4 B = 8 GiB.
BIG = ModelConfig(vocab_size=131072, d_model=16, n_layers=1, n_heads=1, max_seq_len=2048, dtype="float32")
BUDGET_BYTES = 1 << 30  # per device: an eighth of those logits


def _loss_and_grad(mdef):
    def loss(params, batch):
        ce_sum, weight_sum, _ = _forward_sums(mdef, params, batch, None)
        return ce_sum / weight_sum

    return jax.value_and_grad(loss)


def _batch(B, T, V, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, V, (B, T)).astype(np.int32),
            "targets": rng.integers(0, V, (B, T)).astype(np.int32),
            "weights": (rng.random((B, T)) < 0.8).astype(np.float32)}  # some padding: weights 0


def test_128k_vocabulary_loss_and_grad_fit_the_budget():
    """Compiled only: the plain form's temporaries would be > 8 GiB."""
    mdef = model_def(BIG)
    B, T, V = 8, 2048, BIG.vocab_size
    params = jax.eval_shape(lambda: mdef.init_params(0))
    batch = {"inputs": jax.ShapeDtypeStruct((B, T), jnp.int32), "targets": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "weights": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    compiled = jax.jit(_loss_and_grad(mdef)).lower(params, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= BUDGET_BYTES, f"{temp / 2**30:.2f} GiB of temporaries, budget {BUDGET_BYTES / 2**30:.2f} GiB"
    assert B * T * V * 4 >= 8 * BUDGET_BYTES  # the budget really is far below the full logits


def _numpy_ce(logits_BTV, targets_BT, weights_BT):
    """Plain float64 softmax cross-entropy: (weighted sum, weight sum, d(sum)/d(logits))."""
    z = logits_BTV - logits_BTV.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, targets_BT[..., None], -1)[..., 0])
    onehot = np.eye(logits_BTV.shape[-1])[targets_BT]
    return (nll * weights_BT).sum(), weights_BT.sum(), (p - onehot) * weights_BT[..., None]


@pytest.mark.parametrize("T,chunk", [(64, 32), (60, 16), (64, 0)])  # even chunks, a padded last chunk, the default
def test_chunked_cross_entropy_matches_numpy(T, chunk):
    """Loss sums and gradients (hidden states and head) against hand-written NumPy, chunked or not."""
    from models.loss import cross_entropy_sums

    B, D, V = 2, 16, 1000
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32) * 0.5
    b = _batch(B, T, V, seed=2)
    t, w = b["targets"], b["weights"]

    def f(x, head):
        return cross_entropy_sums(x, head, t, w, chunk_tokens=chunk or 1 << 20)

    (loss, wsum), vjp = jax.vjp(f, x, head)
    gx, ghead = vjp((jnp.float32(1.0), jnp.float32(0.0)))
    logits = x.astype(np.float64) @ head.astype(np.float64)
    ref_loss, ref_w, dlogits = _numpy_ce(logits, t, w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(wsum, ref_w, rtol=0)
    np.testing.assert_allclose(gx, dlogits @ head.astype(np.float64).T, atol=1e-5)
    np.testing.assert_allclose(ghead, np.einsum("btd,btv->dv", x, dlogits), atol=1e-5)


def test_train_loss_matches_the_plain_logits_form():
    """The train step's chunked loss (many chunks) gives the loss and every parameter gradient of the plain form:
    full logits from the model, then softmax cross-entropy over them. Tied embedding: the table's gradient
    sums the lookup's part and the chunked head's part."""
    cfg = ModelConfig(vocab_size=1000, d_model=16, n_layers=1, n_heads=2, max_seq_len=64, dtype="float32",
                      loss_chunk=32)  # 2 x 64 tokens: 4 chunks of 2 x 16
    mdef = model_def(cfg)
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), mdef.param_shapes())
    b = _batch(2, 64, cfg.vocab_size, seed=3)

    def plain(params, batch):
        logits = mdef.apply(params, batch["inputs"]).astype(jnp.float32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        return (nll * batch["weights"]).sum() / batch["weights"].sum()

    loss, grads = jax.jit(_loss_and_grad(mdef))(params, b)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(plain))(params, b)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_loss_chunk_is_validated():
    with pytest.raises(ValueError, match="loss_chunk"):
        dataclasses.replace(BIG, loss_chunk=-1)


def _collectives_in_loops(hlo: str) -> list[tuple[str, int]]:
    """(opcode, elements of its largest array) of every collective inside a while loop's body."""
    import math
    import re

    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    found, comp = [], None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if header:
            comp = header.group(1)
            continue
        m = re.search(r"=\s*(.*?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
                      line)
        if m and comp in bodies:
            dims = re.findall(r"\[([\d,]*)\]", m.group(1))
            sizes = [math.prod(int(d) for d in ds.split(",") if d) for ds in dims]
            found.append((m.group(2), max(sizes)))
    return found


@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_chunks_move_no_head_sized_data_per_chunk(sizes):
    """On a mesh, the loop over chunks neither re-gathers the (D, V) head nor reduces its gradient once per chunk
    (that is n times the traffic of one FSDP step): only per-token statistics cross devices inside the loop. And
    the sharded loss and gradients equal the single-device ones."""
    from flax.core import spmd
    from jax.sharding import NamedSharding, PartitionSpec

    from helpers import mesh_for
    from models.loss import cross_entropy_sums
    from parallel.rules import activate

    B, T, D, V = 16, 64, 32, 2048
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    head = (0.3 * rng.normal(size=(D, V))).astype(np.float32)
    b = _batch(B, T, V, seed=6)

    def f(x, head, t, w):
        return cross_entropy_sums(x, head, t, w, chunk_tokens=16)[0]  # 8 to 64 chunks, by rows per device

    grad = jax.value_and_grad(f, argnums=(0, 1))
    ref_loss, (ref_gx, ref_gh) = jax.jit(grad)(x, head, b["targets"], b["weights"])
    mesh = mesh_for(**sizes)
    with activate(mesh):
        spec = lambda *names: NamedSharding(mesh, spmd.get_pspec(PartitionSpec(*names)))  # noqa: E731
        step = jax.jit(grad, in_shardings=(spec("batch", "length", "act_embed"), spec("embed", "vocab"),
                                           spec("batch", "length"), spec("batch", "length")))
        hlo = step.lower(x, head, b["targets"], b["weights"]).compile().as_text()
        loss, (gx, gh) = step(x, head, b["targets"], b["weights"])
    assert "while" in hlo
    big = [(op, n) for op, n in _collectives_in_loops(hlo) if n >= D * V // 8]
    assert not big, big
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-6)
    np.testing.assert_allclose(gh, ref_gh, atol=1e-5)

"""Optax chains against hand-written NumPy updates, LAMB on stacked (scanned / expert) parameters, schedules, and
what the train step logs and draws: the lr it applies, and dropout keys of their own."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data.loader import process_rows, to_global
from helpers import TINY, mesh_for, random_batches, train_losses
from optim.chains import OptimConfig, build_optimizer, decay_mask, make_schedule
from parallel.mesh import batch_sharding
from parallel.rules import activate
from train.state import init_state, model_def, state_shardings
from train.step import make_train_step

PARAMS = {
    "embed_VD": jnp.full((4, 3), 0.5),
    "blocks": {"0": {"attn": {"wq_DNH": jnp.full((3, 2, 2), -0.3)}, "attn_norm": {"scale_D": jnp.ones(3)}}},
}
AXES = jax.tree.map(lambda p: (None,) * p.ndim, PARAMS)  # nothing stacked: one tensor per leaf
GRADS = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), PARAMS)
HYPER = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)


def test_decay_mask():
    mask = decay_mask(PARAMS)
    assert mask["blocks"]["0"]["attn"]["wq_DNH"] is True
    assert mask["blocks"]["0"]["attn_norm"]["scale_D"] is False
    assert mask["embed_VD"] is False
    assert decay_mask(PARAMS, decay_embeddings=True)["embed_VD"] is True
    with pytest.raises(ValueError, match="no weight-decay rule"):
        decay_mask({"mystery": jnp.ones(2)})


def numpy_steps(p, grads, *, lr, b1, b2, eps, weight_decay, decay: bool, trust: bool):
    """Reference AdamW / LAMB for one tensor in float64, straight from the papers: bias-corrected moments,
    decoupled weight decay (only where decayed), and for LAMB one trust ratio ||p|| / ||update|| for the tensor."""
    p, m, v = np.asarray(p, np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if decay:
            u = u + weight_decay * p
        if trust:
            p_norm, u_norm = np.linalg.norm(p), np.linalg.norm(u)
            u = u * (p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
        p = p - lr * u
    return p


def run_chain(tx, params, grads_seq):
    """Params after one update per gradient tree, in one jit (op by op, every leaf would compile its own ops)."""

    @jax.jit
    def run(params, grads_seq):
        state = tx.init(params)
        for grads in grads_seq:
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    return run(params, grads_seq)


def grad_steps(n: int, seed: int = 0) -> list:
    """Gradients that change size and sign between steps, so bias correction and the moments matter."""
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda g: g * s + jnp.asarray(rng.normal(size=g.shape), jnp.float32), GRADS)
            for s in (1.0, -3.0, 0.3)[:n]]


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_three_steps_match_numpy(name):
    cfg = OptimConfig(name=name, warmup_steps=0, schedule="constant", clip_norm=0.0, **HYPER)
    tx, _ = build_optimizer(cfg, 10, AXES)
    seq = grad_steps(3)
    ours = run_chain(tx, PARAMS, seq)
    mask = decay_mask(PARAMS)
    flat = lambda t: jax.tree_util.tree_leaves_with_path(t)  # noqa: E731
    for (path, p), d, got, gs in zip(flat(PARAMS), jax.tree.leaves(mask), jax.tree.leaves(ours),
                                     zip(*map(jax.tree.leaves, seq))):
        want = numpy_steps(p, gs, decay=d, trust=name == "lamb", **HYPER)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # The reference can tell a decayed leaf from an undecayed one: the embedding would have moved elsewhere.
    decayed = numpy_steps(PARAMS["embed_VD"], [s["embed_VD"] for s in seq], decay=True, trust=name == "lamb", **HYPER)
    assert not np.allclose(ours["embed_VD"], decayed, rtol=1e-6, atol=0)


def test_adamw_first_step_by_hand():
    """First AdamW step: -lr * (sign(g) + wd * p) on decayed leaves (bias-corrected moments give g/|g|)."""
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant", clip_norm=0.0, eps=1e-12)
    tx, _ = build_optimizer(cfg, 10)
    upd, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    g, p = GRADS["blocks"]["0"]["attn"]["wq_DNH"], PARAMS["blocks"]["0"]["attn"]["wq_DNH"]
    np.testing.assert_allclose(upd["blocks"]["0"]["attn"]["wq_DNH"], -0.1 * (np.sign(g) + 0.5 * p), rtol=1e-5)
    g = GRADS["embed_VD"]
    np.testing.assert_allclose(upd["embed_VD"], -0.1 * np.sign(g), rtol=1e-5)


def test_clipping_is_in_the_chain():
    """Clip to global norm 0.1, then AdamW: equal to NumPy AdamW on gradients clipped by hand, and unlike plain
    AdamW when the gradients change size between steps."""
    hyper = {**HYPER, "weight_decay": 0.0}
    clipped, _ = build_optimizer(OptimConfig(clip_norm=0.1, warmup_steps=0, schedule="constant", **hyper), 10)
    seq = [jax.tree.map(lambda g: g * s, GRADS) for s in (1.0, 10.0, 0.01)]

    def clip(grads):
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
        return [np.asarray(g, np.float64) * min(1.0, 0.1 / norm) for g in jax.tree.leaves(grads)]

    by_hand = list(zip(*map(clip, seq)))
    ours = run_chain(clipped, PARAMS, seq)
    for p, got, gs in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(ours), by_hand):
        np.testing.assert_allclose(got, numpy_steps(p, gs, decay=False, trust=False, **hyper), rtol=2e-5, atol=1e-7)
    unclipped = [numpy_steps(p, gs, decay=False, trust=False, **hyper)
                 for p, gs in zip(jax.tree.leaves(PARAMS), zip(*(jax.tree.leaves(s) for s in seq)))]
    assert not all(np.allclose(a, b, rtol=1e-5) for a, b in zip(jax.tree.leaves(ours), unclipped))


# --- LAMB on stacked parameters: one trust ratio per layer of a scan and per expert --------------------------

def random_like(shapes, seed: int):
    """Random tensors whose slices along the first two axes differ in size (x0.5 to x2, x1 to x3), so a trust ratio
    shared by stacked layers or experts is far from each slice's own."""
    rng = np.random.default_rng(seed)

    def draw(s):
        x = rng.normal(0.0, 0.02, s.shape)
        for axis, (lo, hi) in enumerate([(0.5, 2.0), (1.0, 3.0)][:max(len(s.shape) - 1, 0)]):
            x = x * np.linspace(lo, hi, s.shape[axis]).reshape((-1,) + (1,) * (len(s.shape) - axis - 1))
        return x.astype(np.float32)  # NumPy: slicing layers apart costs no compiles

    return jax.tree.map(draw, shapes)


def per_layer(tree: dict, n_layers: int) -> dict:
    """A scanned model's params, (L, ...) leaves under 'blocks', in the unscanned layout {i: layer i}."""
    return {**tree, "blocks": {i: jax.tree.map(lambda x: x[i], tree["blocks"]) for i in range(n_layers)}}


LAMB = OptimConfig(name="lamb", lr=0.1, weight_decay=0.1, warmup_steps=0, schedule="constant", clip_norm=1.0)


@pytest.mark.parametrize("model", [dataclasses.replace(TINY, scan_layers=True),
                                   dataclasses.replace(TINY, scan_layers=True, moe_experts=4)], ids=["dense", "moe"])
def test_lamb_scanned_equals_unscanned(model):
    """One LAMB step (weight decay, clipping, lr 0.1) on a scanned model and on the same weights laid out per
    layer: equal parameters. Clipping's global norm is the same in both layouts; only the trust ratio could differ."""
    scanned, unscanned = model_def(model), model_def(dataclasses.replace(model, scan_layers=False))
    params = random_like(scanned.param_shapes(), 0)
    grads = random_like(scanned.param_shapes(), 1)
    flat_params = per_layer(params, model.n_layers)
    assert jax.tree.map(np.shape, flat_params) == jax.tree.map(lambda s: s.shape, unscanned.param_shapes())

    tx_s, _ = build_optimizer(LAMB, 10, scanned.logical_axes())
    tx_u, _ = build_optimizer(LAMB, 10, unscanned.logical_axes())
    after_s = per_layer(run_chain(tx_s, params, [grads]), model.n_layers)
    after_u = run_chain(tx_u, flat_params, [per_layer(grads, model.n_layers)])
    moved = False
    for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(after_s), jax.tree.leaves(after_u),
                               jax.tree.leaves(flat_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        moved |= bool(np.abs(np.asarray(b) - np.asarray(p)).max() > 1e-3)
    assert moved  # lr 0.1 moves the parameters well past the tolerance


def test_lamb_one_trust_ratio_per_expert():
    """An (E, ...) expert leaf gets E trust ratios, each from its own expert's slices (NumPy, expert by expert);
    the router, whose expert axis is not leading, gets one."""
    model = dataclasses.replace(TINY, moe_experts=4)
    mdef = model_def(model)
    params, grads = random_like(mdef.param_shapes(), 2), random_like(mdef.param_shapes(), 3)
    cfg = dataclasses.replace(LAMB, clip_norm=0.0)
    tx, _ = build_optimizer(cfg, 10, mdef.logical_axes())
    after = run_chain(tx, params, [grads])
    hyper = dict(lr=cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, decay=True, trust=True)
    mlp, g_mlp, got = params["blocks"][0]["mlp"], grads["blocks"][0]["mlp"], after["blocks"][0]["mlp"]
    for name in ("wi_EDIF", "wo_EFD"):
        want = np.stack([numpy_steps(mlp[name][e], [g_mlp[name][e]], **hyper) for e in range(model.moe_experts)])
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
    want = numpy_steps(mlp["w_router_DE"], [g_mlp["w_router_DE"]], **hyper)
    np.testing.assert_allclose(got["w_router_DE"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules(kind):
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule=kind, min_lr_ratio=0.1)
    s = make_schedule(cfg, 100)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[kind]
    assert float(s(100)) == pytest.approx(end, rel=1e-4)
    if kind == "cosine":
        assert float(s(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)  # halfway down the cosine


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_short_run_lowers_loss(name):
    batches = random_batches(1, batch=8, seq=16) * 30  # one batch, memorised
    lr = 1e-2 if name == "adamw" else 3e-2
    losses = train_losses(mesh_for(), batches, optim=OptimConfig(name=name, lr=lr, warmup_steps=2))
    assert losses[-1] < 0.8 * losses[0], losses


def test_light_compiled_initialisation_gives_the_same_bits():
    """init_state compiles at LLVM level 1 on a CPU (faster start-up): every leaf of the state equals the one the
    default compile gives, bit for bit, on 1 device and sharded over 8."""
    from train.state import LIGHT_COMPILE, select

    for mesh in (mesh_for(), mesh_for(data=2, fsdp=2, tensor=2)):
        mdef = model_def(dataclasses.replace(TINY, vocab_size=64))
        tx, _ = build_optimizer(OptimConfig(), 10)
        with activate(mesh):
            shardings = state_shardings(tx, mdef, mesh)
            light = init_state(tx, mdef, shardings, seed=3)

            def init(_):
                params = mdef.init_params(3)
                return {"step": jnp.zeros((), jnp.int32), "params": params,
                        "opt_state": tx.init(select(params, mdef.trainable))}

            default = jax.jit(init, out_shardings=shardings)(None)
        assert LIGHT_COMPILE["xla_backend_optimization_level"] < 3
        for a, b in zip(jax.tree.leaves(light), jax.tree.leaves(default), strict=True):
            assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))


# --- The train step: the lr it logs is the lr it applies; dropout draws from its own key stream --------------

def run_steps(model, optim, batches, seed=0):
    """(params before each step as NumPy, metrics of each step) from the real jitted train step on one device."""
    mesh, mdef = mesh_for(), model_def(model)
    tx, schedule = build_optimizer(optim, 100)
    befores, metrics = [], []
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        state = init_state(tx, mdef, shardings, seed)
        bs = batch_sharding(mesh)
        step = make_train_step(mdef, tx, schedule, accum_steps=1, seed=seed, state_shardings=shardings,
                               batch_sharding=bs)
        for b in batches:
            befores.append(jax.tree.map(np.array, state["params"]))
            rows = process_rows(bs, len(b["inputs"]))
            state, m = step(state, to_global({k: v[rows] for k, v in b.items()}, bs, len(b["inputs"])))
            metrics.append(jax.tree.map(np.array, m))
        befores.append(jax.tree.map(np.array, state["params"]))
    return mdef, befores, metrics


# b1 = b2 = 0 and no decay make each AdamW update exactly lr * sign(g), so the lr a step applied can be read off
# the parameters. A NaN in step 2's weights makes its gradients non-finite, so that step is skipped.
SIGN_SGD = OptimConfig(lr=1e-2, b1=0.0, b2=0.0, eps=1e-20, weight_decay=0.0, warmup_steps=10, schedule="linear",
                       clip_norm=0.0)
SKIPPED = 2


@pytest.fixture(scope="module")
def stepped():
    """Six real train steps of a tiny model with dropout on, step SKIPPED non-finite (one compile for both tests)."""
    batches = random_batches(6, batch=4, seq=8)
    batches[SKIPPED]["weights"] = batches[SKIPPED]["weights"] * np.nan
    return batches, *run_steps(dataclasses.replace(TINY, dropout=0.5), SIGN_SGD, batches)


def test_logged_lr_is_the_applied_lr_after_a_skipped_step(stepped):
    """A skipped step does not advance the schedule (optax counts applied updates); the logged lr follows it."""
    _, _, params, metrics = stepped
    w = lambda p: p["blocks"][0]["attn"]["wq_DNH"]  # noqa: E731  (every entry has a nonzero gradient)
    applied = [float(np.median(np.abs(w(b) - w(a)))) for a, b in zip(params, params[1:])]
    logged = [float(m["lr"]) for m in metrics]
    assert [int(m["skipped_steps"]) for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert applied[SKIPPED] == 0.0  # the skipped step left the parameters alone
    del applied[SKIPPED], logged[SKIPPED]
    np.testing.assert_allclose(logged, applied, rtol=1e-4, atol=1e-9)
    assert applied[-1] == pytest.approx(4e-3, rel=1e-4)  # 6 steps, 1 skipped: the 5th update uses schedule(4)


def test_dropout_keys_are_not_the_parameter_init_keys(stepped):
    """Flax draws parameter-init keys from nnx.Rngs(params=seed); a dropout mask drawn from one of those keys is
    correlated with the weights it drops. Recompute each step's loss and gradient norm with each init key as the
    dropout key: none may reproduce the step's own pair (and dropout must be on: no-dropout gives another pair)."""
    batches, mdef, params, metrics = stepped
    rngs = nnx.Rngs(params=0)
    init_keys = jnp.stack([rngs.params() for _ in range(2 * len(jax.tree.leaves(params[0])))])

    def loss(p, b, key):
        logits_BTV = mdef.apply(p, b["inputs"], dropout_key=key).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, b["targets"]).mean()

    def loss_and_grad_norm(p, b, key):
        value, grads = jax.value_and_grad(loss)(p, b, key)
        return jnp.stack([value, optax.tree.norm(grads)])

    per_key = jax.jit(jax.vmap(loss_and_grad_norm, in_axes=(None, None, 0)))
    for p, b, m in list(zip(params, batches, metrics))[:SKIPPED]:
        step = np.array([m["loss"], m["grad_norm"]])
        assert not np.allclose(jax.jit(loss_and_grad_norm)(p, b, None), step, rtol=1e-3)
        same = np.isclose(per_key(p, b, init_keys), step, rtol=1e-5, atol=0).all(axis=1)
        assert not same.any(), f"step (loss, grad_norm) {step} reproduced with init key {np.flatnonzero(same)}"

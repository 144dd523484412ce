"""Optax chains: each checked against optax's own reference transform, masks, schedules, and a short run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import mesh_for, random_batches, train_losses
from optim.chains import OptimConfig, build_optimizer, decay_mask, make_schedule

PARAMS = {
    "embed_VD": jnp.full((4, 3), 0.5),
    "blocks": {"0": {"attn": {"wq_DNH": jnp.full((3, 2, 2), -0.3)}, "attn_norm": {"scale_D": jnp.ones(3)}}},
}
GRADS = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), PARAMS)


def test_decay_mask():
    mask = decay_mask(PARAMS)
    assert mask["blocks"]["0"]["attn"]["wq_DNH"] is True
    assert mask["blocks"]["0"]["attn_norm"]["scale_D"] is False
    assert mask["embed_VD"] is False
    assert decay_mask(PARAMS, decay_embeddings=True)["embed_VD"] is True
    with pytest.raises(ValueError, match="no weight-decay rule"):
        decay_mask({"mystery": jnp.ones(2)})


@pytest.mark.parametrize("name, reference", [("adamw", optax.adamw), ("lamb", optax.lamb)])
def test_one_update_matches_optax_reference(name, reference):
    cfg = OptimConfig(name=name, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, warmup_steps=0,
                      schedule="constant", clip_norm=0.0)
    tx, _ = build_optimizer(cfg, 10)
    mask = decay_mask(PARAMS)
    ref = reference(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, mask=mask)
    ours_state, ref_state = tx.init(PARAMS), ref.init(PARAMS)
    for _ in range(2):
        ours, ours_state = tx.update(GRADS, ours_state, PARAMS)
        theirs, ref_state = ref.update(GRADS, ref_state, PARAMS)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    # The mask matters: without it the norm scale and the embedding would decay too, and the updates differ.
    unmasked = reference(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
    plain, _ = unmasked.update(GRADS, unmasked.init(PARAMS), PARAMS)
    first, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    assert not np.allclose(first["blocks"]["0"]["attn_norm"]["scale_D"], plain["blocks"]["0"]["attn_norm"]["scale_D"])
    assert not np.allclose(first["embed_VD"], plain["embed_VD"])


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
    """With clipping on, updates follow clip -> adamw; with grads of changing size, clipping changes them."""
    common = dict(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    clipped, _ = build_optimizer(OptimConfig(clip_norm=0.1, **common), 10)
    plain, _ = build_optimizer(OptimConfig(clip_norm=0.0, **common), 10)
    ref = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.0))
    states = [t.init(PARAMS) for t in (clipped, plain, ref)]
    for scale in (1.0, 10.0, 0.01):
        grads = jax.tree.map(lambda g: g * scale, GRADS)
        outs = []
        for i, t in enumerate((clipped, plain, ref)):
            u, states[i] = t.update(grads, states[i], PARAMS)
            outs.append(jax.tree.leaves(u))
    for a, b in zip(outs[0], outs[2]):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(outs[0], outs[1]))


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

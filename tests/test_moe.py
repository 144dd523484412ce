"""Mixture of experts: routing against a plain reference, dropped tokens, aux losses in the loss, causality, and
expert parallelism (expert=4 x data=2 on 8 devices trains exactly like 1 device)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.loader import process_rows, to_global
from helpers import TINY, mesh_for, random_batches
from models.moe import MoEMLP, capacity
from models.transformer import Transformer
from optim.chains import OptimConfig, build_optimizer
from parallel.mesh import batch_sharding
from parallel.rules import activate
from train.state import init_state, model_def, state_shardings
from train.step import make_train_step

MOE = dataclasses.replace(TINY, moe_experts=4, moe_top_k=2, moe_capacity_factor=0.0)  # dropless


def _moe_layer(top_k, capacity_factor, seed=0):
    return MoEMLP(16, 24, 4, top_k=top_k, capacity_factor=capacity_factor, kind="gelu", gelu_approximate=True,
                  init_std=0.5, out_std=0.5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def _reference(layer: MoEMLP, x_GSD: np.ndarray, top_k: int, slots: int):
    """Plain loops: each token's top-k experts in order, first come first served, kept while slots remain."""
    w_router = np.asarray(layer.w_router_DE[...])
    wi, wo = np.asarray(layer.wi_EDIF[...])[:, :, 0], np.asarray(layer.wo_EFD[...])
    out, dropped = np.zeros_like(x_GSD), 0
    for g, x_SD in enumerate(x_GSD):
        logits = x_SD @ w_router
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        used = np.zeros(len(wi), int)
        for s, x_D in enumerate(x_SD):
            choices = np.argsort(-probs[s])[:top_k]
            gates = probs[s, choices] / (probs[s, choices].sum() if top_k > 1 else 1.0)
            for e, gate in zip(choices, gates):
                if used[e] < slots:
                    used[e] += 1
                    out[g, s] += gate * (np.asarray(jax.nn.gelu(x_D @ wi[e], approximate=True)) @ wo[e])
                else:
                    dropped += 1
    return out, dropped / (x_GSD.shape[0] * x_GSD.shape[1] * top_k)


@pytest.mark.parametrize("top_k, capacity_factor", [(1, 1.0), (2, 1.0), (2, 0.5), (2, 0.0)])
def test_routing_matches_reference_and_counts_dropped_tokens(top_k, capacity_factor):
    layer = _moe_layer(top_k, capacity_factor)
    x_GSD = np.asarray(jax.random.normal(jax.random.key(1), (3, 12, 16)))
    slots = capacity(12, 4, top_k, capacity_factor)
    y_GSD, stats = layer(jnp.asarray(x_GSD))
    ref, dropped = _reference(layer, x_GSD, top_k, slots)
    np.testing.assert_allclose(y_GSD, ref, rtol=1e-5, atol=1e-5)  # dropped assignments contribute nothing
    np.testing.assert_allclose(stats["moe_dropped_frac"], dropped, atol=1e-6)
    if capacity_factor == 0.0:
        assert dropped == 0.0
    if capacity_factor == 0.5:
        assert dropped > 0.2  # half the slots that would be needed: many assignments must drop
    np.testing.assert_allclose(stats["moe_expert_frac"].sum(), 1.0, rtol=1e-6)


def test_a_token_with_every_choice_dropped_gets_zero():
    layer = _moe_layer(1, 1.0)
    x_GSD = jnp.tile(jax.random.normal(jax.random.key(2), (1, 1, 16)), (1, 8, 1))  # 8 identical tokens
    y_GSD, stats = layer(x_GSD)
    slots = capacity(8, 4, 1, 1.0)  # 2: all 8 pick the same expert, 2 fit
    np.testing.assert_allclose(stats["moe_dropped_frac"], 1 - slots / 8)
    assert np.abs(np.asarray(y_GSD[0, :slots])).max() > 0
    np.testing.assert_array_equal(y_GSD[0, slots:], 0.0)


def test_aux_losses():
    layer = _moe_layer(2, 0.0)
    x = jax.random.normal(jax.random.key(3), (2, 16, 16))
    _, stats = layer(x)
    logits = np.einsum("gsd,de->gse", np.asarray(x), np.asarray(layer.w_router_DE[...]))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[..., :2]
    frac = np.array([(top2 == e).mean() for e in range(4)])  # share of all (token, choice) assignments
    np.testing.assert_allclose(stats["moe_expert_frac"], frac, rtol=1e-6)
    np.testing.assert_allclose(stats["moe_lb_loss"], 4 * np.sum(frac * probs.mean((0, 1))), rtol=1e-5)
    np.testing.assert_allclose(stats["moe_z_loss"], (np.log(np.exp(logits).sum(-1)) ** 2).mean(), rtol=1e-5)
    # Perfectly balanced routing gives a balance loss of 1.
    uniform = _moe_layer(2, 0.0)
    uniform.w_router_DE[...] = jnp.zeros_like(uniform.w_router_DE[...])
    np.testing.assert_allclose(uniform(x)[1]["moe_lb_loss"], 1.0, rtol=1e-6)


def test_moe_model_is_causal_even_when_tokens_drop():
    cfg = dataclasses.replace(MOE, moe_capacity_factor=0.5, moe_top_k=2)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    changed = toks.at[:, 10:].set((toks[:, 10:] + 1) % 64)
    (a, aux), b = m(toks, return_aux=True), m(changed)
    assert aux["moe_dropped_frac"] > 0
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)


def _train(mesh, model, batches, optim=OptimConfig(warmup_steps=2)):
    mdef = model_def(model)
    tx, schedule = build_optimizer(optim, 100)
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        state = init_state(tx, mdef, shardings, 0)
        bs = batch_sharding(mesh)
        step = make_train_step(mdef, tx, schedule, accum_steps=optim.accum_steps, seed=0,
                               state_shardings=shardings, batch_sharding=bs)
        out = []
        for b in batches:
            rows = process_rows(bs, len(b["inputs"]))
            state, m = step(state, to_global({k: v[rows] for k, v in b.items()}, bs, len(b["inputs"])))
            out.append(jax.device_get(m))
    return out


@pytest.fixture(scope="module")
def moe_batches():
    return random_batches(5, batch=16, seq=16)


@pytest.fixture(scope="module")
def moe_reference(moe_batches):
    return _train(mesh_for(), MOE, moe_batches)


@pytest.mark.parametrize("layout", [dict(data=2, expert=4), dict(data=2, expert=2, tensor=2), dict(fsdp=2, expert=4)],
                         ids=["expert=4 x data=2", "expert=2 x tensor=2 x data=2", "expert=4 x fsdp=2"])
def test_expert_parallel_matches_one_device(layout, moe_batches, moe_reference):
    """Experts split over the expert axis with all-to-all dispatch: same losses as 1 device, no dropped tokens."""
    ref, got = moe_reference, _train(mesh_for(**layout), MOE, moe_batches)
    for m in ref + got:
        assert m["moe_dropped_frac"] == 0.0
    assert ref[-1]["loss"] < ref[0]["loss"]
    for key in ("loss", "moe_aux_loss", "moe_lb_loss", "moe_z_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got[-1]["moe_expert_frac"], ref[-1]["moe_expert_frac"], rtol=1e-5)


def test_aux_losses_are_in_the_training_loss():
    batches = random_batches(2, batch=8, seq=16)
    on = _train(mesh_for(), MOE, batches)
    off = _train(mesh_for(), dataclasses.replace(MOE, moe_lb_weight=0.0, moe_z_weight=0.0), batches)
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], rel=1e-6)  # `loss` is the language-model loss alone
    assert off[0]["moe_aux_loss"] == 0.0 and on[0]["moe_aux_loss"] > 0.0
    assert on[0]["grad_norm"] != pytest.approx(off[0]["grad_norm"], rel=1e-5)  # the aux losses have a gradient
    # Accumulating 2 micro-batches: each micro-batch's aux mean is weighted by its tokens and divided once, so
    # the update is close to the whole batch's (the balance loss of a half batch is not exactly half of it).
    acc = _train(mesh_for(), MOE, batches, optim=OptimConfig(warmup_steps=2, accum_steps=2))
    assert abs(acc[1]["loss"] - on[1]["loss"]) / on[1]["loss"] < 1e-3


def test_moe_metrics_reach_metrics_jsonl(tmp_path):
    import json

    from helpers import meshforge

    r = meshforge("train", "experiments/shakespeare_char.py", "--workdir", tmp_path / "moe", "--train.steps", "10",
                  "--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2", "--model.moe_experts", "4",
                  "--model.moe_every", "2", "--train.seq_len", "16", "--train.batch_size", "4",
                  "--train.log_every", "5", "--train.eval_batches", "1", "--log.progress", "none", devices=2)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    row = [x for x in rows if "loss" in x][-1]
    assert {"moe_aux_loss", "moe_lb_loss", "moe_z_loss", "moe_dropped_frac", "mfu"} <= set(row)
    fracs = [row[f"moe_expert_frac_{e}"] for e in range(4)]
    assert abs(sum(fracs) - 1) < 1e-4 and 0 <= row["moe_dropped_frac"] < 1

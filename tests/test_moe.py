"""Mixture of experts: routing against a plain reference, dropped tokens, aux losses in the loss, causality, what
competes for capacity (a row's own tokens only), dispatch memory linear in tokens, and expert parallelism (expert=4 x
data=2 on 8 devices trains exactly like 1 device, also while tokens are dropped)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec

from data.loader import process_rows, to_global
from helpers import TINY, mesh_for, random_batches
from models.moe import MoEMLP, capacity
from models.transformer import Transformer
from optim.chains import OptimConfig, build_optimizer
from parallel.mesh import batch_sharding
from parallel.rules import RULES, activate
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


def test_capacity_is_per_row_other_rows_never_change_a_row():
    """Each batch row is its own capacity group: rewriting row 0 (whose tokens come first in the batch) leaves row 1
    alone, even though row 0's new tokens all crowd one expert. A batch-wide capacity would drop row 1's tokens."""
    layer = _moe_layer(1, 1.0)
    x_GSD = jax.random.normal(jax.random.key(4), (2, 16, 16))
    crowd_SD = jnp.tile(x_GSD[1, :1], (16, 1))  # 16 copies of one token: one expert, far beyond its 4 slots
    y_GSD, stats = layer(x_GSD)
    y2_GSD, stats2 = layer(x_GSD.at[0].set(crowd_SD))
    assert stats2["moe_dropped_frac"] > stats["moe_dropped_frac"] > 0
    np.testing.assert_array_equal(y2_GSD[1], y_GSD[1])
    ref, _ = _reference(layer, np.asarray(x_GSD[1:]), 1, capacity(16, 4, 1, 1.0))  # row 1 alone
    np.testing.assert_allclose(y_GSD[1], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_packed_neighbours_compete_for_capacity_only_from_earlier_in_the_row(capacity_factor):
    """Two documents packed in one row (tokens 0-7, 8-15): the README's claim. Slots go in token order, so the
    later document never changes the earlier one; the earlier one takes slots from the later one unless dropless."""
    layer = _moe_layer(2, capacity_factor)
    x_GSD = jax.random.normal(jax.random.key(5), (1, 16, 16))
    y_GSD, stats = layer(x_GSD)
    new_first = layer(x_GSD.at[0, :8].set(jnp.tile(x_GSD[0, 8:9], (8, 1))))[0]  # doc A crowds doc B's experts
    new_second = layer(x_GSD.at[0, 8:].set(jnp.tile(x_GSD[0, :1], (8, 1))))[0]
    np.testing.assert_array_equal(new_second[0, :8], y_GSD[0, :8])
    if capacity_factor <= 0:
        assert stats["moe_dropped_frac"] == 0
        np.testing.assert_array_equal(new_first[0, 8:], y_GSD[0, 8:])
    else:
        assert np.abs(np.asarray(new_first[0, 8:] - y_GSD[0, 8:])).max() > 1e-3


def test_dropless_dispatch_memory_is_linear_in_tokens():
    """Dropless at S=4096 tokens, E=8: a one-hot (S, E, C=S) dispatch tensor alone is 4096*8*4096*4 B = 512 MiB
    per row (and the combine tensor as much again). The layer's whole forward+backward must fit in 64 MiB of
    temporaries, which the useful buffers (expert inputs and hidden, (E, S, 16+24) floats = 5 MiB) leave room for."""
    layer = MoEMLP(16, 24, 8, top_k=2, capacity_factor=0.0, kind="gelu", gelu_approximate=True, init_std=0.5,
                   out_std=0.5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def loss(state, x_GSD):
        y_GSD, stats = nnx.merge(graphdef, state)(x_GSD)
        return y_GSD.sum() + stats["moe_lb_loss"]

    x_GSD = jax.ShapeDtypeStruct((1, 4096, 16), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x_GSD).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    assert temp_mib < 64, f"dropless MoE forward+backward needs {temp_mib:.0f} MiB of temporaries at S=4096"


def test_dropping_under_expert_parallelism_matches_one_device():
    """Capacity 0.5 drops assignments; on expert=4 x data=2 the routing, outputs and gradients equal 1 device's,
    and the experts' inputs move by all-to-all (not by gathering every token everywhere)."""
    layer = _moe_layer(2, 0.5)
    graphdef, state = nnx.split(layer)
    x_GSD = jax.random.normal(jax.random.key(6), (8, 16, 16))

    def loss(state, x_GSD):
        y_GSD, stats = nnx.merge(graphdef, state)(x_GSD)
        return (y_GSD**2).sum() + stats["moe_lb_loss"], (y_GSD, stats)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y_ref, stats_ref)), grads_ref = step(state, x_GSD)
    assert stats_ref["moe_dropped_frac"] > 0.1

    mesh = mesh_for(data=2, expert=4)
    with activate(mesh):
        with spmd.logical_axis_rules(RULES):
            specs = nnx.get_partition_spec(state)
        state_sh = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                      is_leaf=lambda s: isinstance(s, PartitionSpec)))
        x_sh = jax.device_put(x_GSD, batch_sharding(mesh))
        assert "all-to-all" in step.lower(state_sh, x_sh).compile().as_text()
        (_, (y, stats)), grads = step(state_sh, x_sh)
    assert state_sh["wi_EDIF"][...].sharding.spec[0] == "expert"
    np.testing.assert_allclose(stats["moe_dropped_frac"], stats_ref["moe_dropped_frac"], rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        # Summed over devices in another order: exact up to float32 rounding at the gradient's own scale.
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())


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

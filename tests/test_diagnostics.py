"""Training diagnostics (log.diagnostics_every): the figures against an independent jax.grad, the vanishing
gradient warning on a deliberately broken initialisation, and nothing at all when they are off."""
import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from helpers import TINY, learnable_batches, mesh_for, meshforge
from optim.chains import OptimConfig, build_optimizer
from parallel.errors import UserError
from parallel.mesh import batch_sharding
from parallel.rules import activate
from train.config import Config, LogConfig, TrainConfig, apply_overrides, load_experiment
from train.setup import build
from train.diagnostics import Diagnostics, check_every, layout, unpack
from train.state import abstract_state, model_def, state_shardings
from train.step import make_train_step

DEEP = dataclasses.replace(TINY, n_layers=4)
OPTIM = OptimConfig(warmup_steps=0, clip_norm=0.0)  # the first step moves the parameters


def random_params(shapes: dict, scale: float = 1.0, seed: int = 0) -> dict:
    """Parameters like the model's initialisation (normal(0.02) weights, unit norm scales) times `scale`, drawn
    with NumPy: the model's own initialisation takes seconds to run or compile on a CPU."""
    rng = np.random.default_rng(seed)
    draw = lambda path, s: scale * (np.ones(s.shape, np.float32) if path[-1].key == "scale_D"  # noqa: E731
                                    else rng.normal(0, 0.02, s.shape).astype(np.float32))
    return jax.tree_util.tree_map_with_path(draw, shapes)


def run_steps(model, batches, diagnostics: int):
    """(mdef, initial params, per-step metrics on the host, final state) of one step per batch on one device,
    from random_params."""
    mdef = model_def(model)
    tx, schedule = build_optimizer(OPTIM, 100, mdef.logical_axes())
    mesh = mesh_for()
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        params0 = random_params(mdef.param_shapes())
        state = jax.device_put({"step": np.int32(0), "params": params0, "opt_state": tx.init(params0)}, shardings)
        step = make_train_step(mdef, tx, schedule, accum_steps=1, seed=0, state_shardings=shardings,
                               batch_sharding=batch_sharding(mesh), diagnostics=diagnostics)
        metrics = []
        for b in batches:
            state, m = step(state, b)
            metrics.append(jax.device_get(m))
    return mdef, params0, metrics, state


def reference(mdef, params, batch):
    """Per-layer and per-group gradient norms, update ratios and activation RMS of one step, from jax.grad of the
    mean cross-entropy, a fresh AdamW update and the model's plain forward pass."""
    def loss(p):
        logits = mdef.apply(p, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    grads = jax.jit(jax.grad(loss))(params)
    tx, _ = build_optimizer(OPTIM, 100, mdef.logical_axes())
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    cfg = mdef.cfg
    sq = lambda tree: sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))  # noqa
    layer = (lambda t, i: jax.tree.map(lambda x: x[i], t["blocks"])) if cfg.scan_layers else \
        (lambda t, i: t["blocks"][i])
    out = {}
    for i in range(cfg.n_layers):
        out[f"diag/grad_norm/layer_{i}"] = np.sqrt(sq(layer(grads, i)))
        out[f"diag/update_ratio/layer_{i}"] = np.sqrt(sq(layer(updates, i)) / sq(layer(params, i)))
    flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa
    g, u, p = flat(grads), flat(updates), flat(params)
    groups = {"attn": lambda k: "'attn'" in k, "mlp": lambda k: "'mlp'" in k,
              "norm": lambda k: "norm" in k, "embed": lambda k: "embed_VD" in k}
    for name, member in groups.items():
        keys = [k for k in g if member(k)]
        out[f"diag/grad_norm/{name}"] = np.sqrt(sum(np.sum(np.square(g[k], dtype=np.float64)) for k in keys))
        out[f"diag/update_ratio/{name}"] = np.sqrt(sum(np.sum(np.square(u[k], dtype=np.float64)) for k in keys)
                                                   / sum(np.sum(np.square(p[k], dtype=np.float64)) for k in keys))
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_figures_match_jax_grad(scan):
    """The per-layer and per-group norms of a step are those of an independent jax.grad on the same batch."""
    model = dataclasses.replace(DEEP, scan_layers=scan)
    [batch] = learnable_batches(1, 8, 16)
    mdef, params0, [m], _ = run_steps(model, [batch], diagnostics=1)
    got = unpack(layout(mdef.cfg, mdef.param_shapes(), mdef.logical_axes()), m["diag"])
    want = reference(mdef, params0, batch)
    assert float(m["grad_norm"]) == pytest.approx(np.sqrt(sum(got[f"diag/grad_norm/{g}"] ** 2
                                                              for g in ("attn", "mlp", "norm", "embed"))), rel=1e-5)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-4), key
    assert all(got[f"diag/act_rms/layer_{i}"] > 0 for i in range(4))


def test_activation_rms_of_identity_layers():
    """With every block's output projections zero each layer passes the stream on unchanged: each layer's
    activation RMS is the RMS of the looked-up embeddings, with or without scan and remat."""
    tokens = np.asarray(learnable_batches(1, 4, 16)[0]["inputs"])
    for model in (DEEP, dataclasses.replace(DEEP, scan_layers=True, remat="full")):
        mdef = model_def(model)
        params = random_params(mdef.param_shapes())
        zero = lambda path, x: np.zeros_like(x) if path[-1].key in ("wo_NHD", "wo_FD") else x  # noqa: E731
        params = jax.tree_util.tree_map_with_path(zero, params)
        _, aux = jax.jit(lambda p, t: mdef.apply(p, t, return_aux=True, act_stats=True))(params, tokens)  # noqa: B023
        want = np.sqrt(np.mean(np.square(np.asarray(params["embed_VD"])[tokens])))
        np.testing.assert_allclose(np.sqrt(aux["act_ms"]), np.full(4, want), rtol=1e-6)


def test_vanishing_warning_names_the_broken_layer(tmp_path, capsys):
    """A layer scaled by 1e-6 after initialisation: the run warns about that layer, and only it; the warning and
    the count reach the log and metrics.jsonl."""
    from train.loop import train

    cfg = load_experiment("experiments/shakespeare_char.py")
    cfg = apply_overrides(cfg, {"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 2, "train.seq_len": 16,
                                "train.batch_size": 8, "train.steps": 4, "train.log_every": 2,
                                "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 0,
                                "log.diagnostics_every": 2, "log.progress": "lines", "log.tensorboard": False})

    def broken(mdef, _shardings):  # layer 1 initialised 1e-6 times too small; the others as usual
        return {"blocks": {1: random_params(mdef.param_shapes()["blocks"][1], scale=1e-6)}}

    train(cfg, tmp_path, initial=broken)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "gradient at step" in ln]
    assert len(warnings) == 2, warnings  # steps 2 and 4
    assert all("vanishing gradient" in w and "layer 1 (blocks/1)" in w for w in warnings), warnings
    assert not any(f"layer {i} (" in w for w in warnings for i in (0, 2, 3)), warnings
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if "diag/vanishing_layers" in r]
    assert [r["step"] for r in diag] == [2, 4]
    assert all(r["diag/vanishing_layers"] == 1 and r["diag/exploding_layers"] == 0 for r in diag)
    assert diag[-1]["diag/grad_norm/layer_1"] < 1e-4 * diag[-1]["diag/grad_norm/layer_0"]


def test_no_warning_for_a_healthy_init_and_exploding_is_named():
    """The host check alone: a healthy step flags nothing; a layer 1000x the median is named as exploding."""
    mdef, _, metrics, _ = run_steps(DEEP, learnable_batches(2, 8, 16), diagnostics=1)
    lay = layout(mdef.cfg, mdef.param_shapes(), mdef.logical_axes())
    logged = []
    diagnostics = Diagnostics(lay, 1, 100.0, 100.0, logged.append)
    for step, m in enumerate(metrics, 1):
        row = diagnostics.row(step, [m])
        assert row["diag/vanishing_layers"] == row["diag/exploding_layers"] == 0
    assert logged == []
    values = unpack(lay, metrics[-1]["diag"])
    values["diag/grad_norm/layer_2"] *= 1000
    assert diagnostics.check(7, values) == ([], [2])
    assert logged and logged[0].startswith("meshforge: warning: exploding gradient at step 7: layer 2 (blocks/2)")


def test_off_traces_nothing_and_on_changes_no_bit():
    """Off: the compiled step returns no diagnostics and its program has fewer operations. On (every 2 steps):
    the same losses and parameters bit for bit; zeros on the steps between."""
    batches = learnable_batches(4, 8, 16)
    _, _, off, off_state = run_steps(TINY, batches, diagnostics=0)
    _, _, on, on_state = run_steps(TINY, batches, diagnostics=2)
    assert not any(k.startswith(("diag", "act_")) for k in off[0])
    assert [float(m["loss"]) for m in off] == [float(m["loss"]) for m in on]
    for a, b in zip(jax.tree.leaves(off_state["params"]), jax.tree.leaves(on_state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.any(on[0]["diag"]) and np.all(np.isfinite(on[1]["diag"])) and np.any(on[1]["diag"])

    mdef = model_def(TINY)
    tx, schedule = build_optimizer(OPTIM, 100, mdef.logical_axes())
    mesh = mesh_for()
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        state = abstract_state(tx, mdef, shardings)
        sizes = [len(str(make_train_step(mdef, tx, schedule, accum_steps=1, seed=0, state_shardings=shardings,
                                         batch_sharding=batch_sharding(mesh), diagnostics=d)
                         .trace(state, batches[0]).jaxpr).splitlines()) for d in (0, 2)]
    assert sizes[0] < sizes[1]


def test_config_refusals():
    with pytest.raises(ValueError, match="log.diagnostics_every"):
        LogConfig(diagnostics_every=-1)
    with pytest.raises(ValueError, match="log.vanishing_factor"):
        LogConfig(vanishing_factor=1.0)
    with pytest.raises(UserError, match=r"log.diagnostics_every: 30 is not a multiple of train.log_every \(20\)"):
        check_every(30, 20)
    check_every(40, 20)
    check_every(0, 20)
    cfg = apply_overrides(load_experiment("experiments/shakespeare_char.py"),
                          {"log.diagnostics_every": 30, "train.log_every": 20, "train.batch_size": 8})
    with pytest.raises(UserError, match="log.diagnostics_every: 30"):  # before any data is read
        build(cfg)
    assert Config(train=TrainConfig(log_every=5), log=LogConfig(diagnostics_every=10)).log.diagnostics_every == 10


def test_cli_run_with_replicas_logs_the_keys(tmp_path):
    """End to end through `meshforge train`, with two replicas (each computes its diagnostics; the row holds
    their mean): the keys reach metrics.jsonl in the rows of the period only, and a healthy run warns nothing."""
    r = meshforge("train", "experiments/shakespeare_char.py", "--workdir", tmp_path / "run", "--model.d_model", "32",
                  "--model.n_layers", "3", "--model.n_heads", "2", "--train.seq_len", "16", "--train.batch_size", "4",
                  "--train.steps", "8", "--train.log_every", "2", "--train.eval_every", "0",
                  "--train.eval_batches", "1", "--train.checkpoint_every", "0", "--log.progress", "lines",
                  "--log.tensorboard", "false", "--outer.replicas", "2", "--outer.inner_steps", "4",
                  "--log.diagnostics_every", "4", devices=2)
    assert r.returncode == 0, r.stderr
    assert "gradient at step" not in r.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with_diag = {r["step"] for r in rows if any(k.startswith("diag/") for k in r)}
    assert with_diag == {4, 8}
    row = next(r for r in rows if r["step"] == 8 and "loss" in r)
    for what in ("grad_norm", "update_ratio", "act_rms"):
        assert all(row[f"diag/{what}/layer_{i}"] > 0 for i in range(3))
    assert all(row[f"diag/grad_norm/{g}"] > 0 for g in ("attn", "mlp", "norm", "embed"))
    assert row["diag/vanishing_layers"] == row["diag/exploding_layers"] == 0

"""Pruning (optim/prune.py): the schedule, masked updates that keep pruned weights at exactly zero, N:M groups
along the input axis, the masks' shardings, and a pruned run through the CLI across a resume onto another mesh."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TINY, checkpoint_state, meshforge, mesh_for
from optim.chains import OptimConfig, build_optimizer
from optim.prune import PruneConfig, mask_update_due, prune, prune_metrics, sparsity_at
from train.state import model_def, state_shardings

AXES = {"blocks": {"0": {"attn": {"wq_DNH": ("embed", "heads", "head_dim"), "wo_NHD": ("heads", "head_dim", "embed")},
                         "mlp": {"wo_EFD": ("expert", "mlp", "embed")}}},
        "embed_VD": ("vocab", "embed"), "final_norm": {"scale_D": ("embed",)}}
TARGETS = ("wq_DNH", "wo_NHD", "wo_EFD")


def toy_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"blocks": {"0": {"attn": {"wq_DNH": jax.random.normal(k[0], (16, 2, 8)),
                                      "wo_NHD": jax.random.normal(k[1], (2, 8, 16))},
                             "mlp": {"wo_EFD": jax.random.normal(k[2], (3, 8, 16))}}},
            "embed_VD": jax.random.normal(k[3], (8, 16)), "final_norm": {"scale_D": jnp.ones(16)}}


def matrices(p):
    b = p["blocks"]["0"]
    return {"wq_DNH": b["attn"]["wq_DNH"], "wo_NHD": b["attn"]["wo_NHD"], "wo_EFD": b["mlp"]["wo_EFD"]}


def run_toy(cfg, steps, seed=0):
    """Adam with gradients that push every weight away from zero: only the masking can keep one there."""
    tx = prune(optax.adam(0.05), cfg, AXES, total_steps=40)
    params, state = toy_params(seed), None
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for _ in range(steps):
        grads = jax.tree.map(lambda p: -jnp.sign(p) - 0.5, params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((jax.device_get(params), jax.device_get(prune_metrics(state)), jax.device_get(state.masks)))
    return history


def test_cubic_schedule_and_its_update_steps():
    cfg = PruneConfig(method="magnitude", sparsity=0.8, start_step=100, end_step=500, update_every=50)
    s = [float(sparsity_at(cfg, t, 1000)) for t in (0, 100, 300, 500, 900)]
    assert s[0] == s[1] == 0.0 and s[3] == s[4] == pytest.approx(0.8)
    assert s[2] == pytest.approx(0.8 * (1 - 0.5 ** 3))  # halfway: 7/8 of the target
    due = [t for t in range(1000) if mask_update_due(cfg, t, 1000)]
    assert due == list(range(100, 501, 50))
    # end_step 0: three quarters into the run; nm: set once, at the start step
    assert PruneConfig(method="magnitude").end(2000) == 1500
    nm = PruneConfig(method="nm", start_step=200)
    assert [t for t in range(2000) if mask_update_due(nm, t, 2000)] == [200]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_keeps_pruned_weights_at_exactly_zero(scope):
    cfg = PruneConfig(method="magnitude", sparsity=0.75, scope=scope, start_step=2, end_step=10, update_every=2)
    history = run_toy(cfg, 14)
    total = sum(w.size for w in matrices(toy_params()).values())
    for t, (params, metrics, masks) in enumerate(history, start=1):
        target = float(sparsity_at(cfg, (t // 2) * 2, 40))  # the last mask update at or before t
        zeros = {k: int((w == 0).sum()) for k, w in matrices(params).items()}
        # Every weight a mask turns off is exactly zero, every other one is not (the gradient pushes it off zero)
        for k, m in matrices(masks).items():
            assert ((matrices(params)[k] == 0) == ~m).all(), (t, k)
        if scope == "layer":
            for k, w in matrices(params).items():
                rows = w.reshape(3, -1) if k == "wo_EFD" else w.reshape(1, -1)  # experts pruned one by one
                assert ((rows == 0).sum(1) == int(np.floor(target * rows.shape[1]))).all(), (t, k)
        else:
            assert sum(zeros.values()) == int(np.floor(target * total)), t
        assert metrics["sparsity"] == pytest.approx(sum(zeros.values()) / total)
        assert metrics["sparsity/blocks/0/attn/wq_DNH"] == pytest.approx(zeros["wq_DNH"] / 256)
        assert (params["embed_VD"] != 0).all() and (params["final_norm"]["scale_D"] != 1).all()  # not targeted
    assert history[-1][1]["sparsity"] == pytest.approx(0.75, abs=1 / total)


def test_two_of_four_groups_run_along_the_input_axis():
    history = run_toy(PruneConfig(method="nm", n=2, m=4, start_step=3), 8)
    for t, (params, _, _) in enumerate(history, start=1):
        w = matrices(params)
        groups = {  # input axes: D of wq_DNH; H (the last input axis) of wo_NHD; F of wo_EFD
            "wq_DNH": np.moveaxis(w["wq_DNH"], 0, -1).reshape(2, 8, 4, 4),
            "wo_NHD": np.moveaxis(w["wo_NHD"], 1, -1).reshape(2, 16, 2, 4),
            "wo_EFD": np.moveaxis(w["wo_EFD"], 1, -1).reshape(3, 16, 2, 4),
        }
        for k, g in groups.items():
            zeros = (g == 0).sum(-1)
            assert (zeros == (2 if t >= 3 else 0)).all(), (t, k, zeros)


def test_masks_are_sharded_like_their_parameters():
    mesh = mesh_for(data=2, fsdp=4)
    mdef = model_def(TINY)
    tx, _ = build_optimizer(OptimConfig(), 10, mdef.logical_axes(), PruneConfig(method="magnitude"))
    shardings = state_shardings(tx, mdef, mesh)
    prune_state = jax.tree.leaves(shardings["opt_state"], is_leaf=lambda x: hasattr(x, "masks"))
    masks = [s.masks for s in prune_state if hasattr(s, "masks")][0]
    assert jax.tree.map(lambda s: s.spec, masks) == jax.tree.map(lambda s: s.spec, shardings["params"])
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(masks))


def test_bad_prune_settings_are_refused_in_one_line(tmp_path):
    for args, needle in ((["--prune.targets", "nothing_here"], "prune.targets"),
                         (["--prune.method", "nm", "--prune.m", "3", "--prune.n", "1"], "prune.m")):
        r = meshforge("train", "experiments/shakespeare_char.py", "--workdir", tmp_path / "bad",
                      "--prune.method", "magnitude", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert not (tmp_path / "bad").exists()


TINY_RUN = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--train.seq_len", "16",
            "--train.batch_size", "4", "--train.eval_every", "0", "--train.eval_batches", "2",
            "--train.checkpoint_every", "6", "--train.log_every=1", "--log.progress", "lines"]


def test_pruned_run_resumes_onto_another_mesh_with_its_masks(tmp_path):
    """2:4 from step 2 and magnitude to 60%: 6 steps on 2 devices, then on to 12 on one device."""
    for method, extra in (("nm", []), ("magnitude", ["--prune.sparsity", "0.6", "--prune.end_step", "8",
                                                     "--prune.update_every", "2"])):
        run = tmp_path / method
        common = ["train", "experiments/shakespeare_char.py", "--workdir", run, *TINY_RUN,
                  "--prune.method", method, "--prune.start_step", "2", *extra]
        first = meshforge(*common, "--train.steps", "6", devices=2)
        assert first.returncode == 0, first.stderr
        second = meshforge(*common, "--train.steps", "12", devices=1)
        assert second.returncode == 0, second.stderr
        assert "resuming at step 6" in second.stderr
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        sparsity = {r["step"]: r["sparsity"] for r in rows if "sparsity" in r}
        assert sorted(sparsity) == list(range(1, 13))
        for step in (6, 12):
            state = checkpoint_state(run, step)
            weights = {k: v for k, v in state["params"]["blocks"]["0"]["attn"].items() if k.startswith("w")}
            weights.update({k: v for k, v in state["params"]["blocks"]["0"]["mlp"].items() if k.startswith("w")})
            assert set(weights) == {"wq_DNH", "wkv_D2KH", "wo_NHD", "wi_DCF", "wo_FD"}
            if method == "nm":
                for k, w in weights.items():
                    axis = w.ndim - 2 if k.startswith("wo") else 0  # the (last) input axis
                    g = np.moveaxis(w, axis, -1).reshape(-1, 4)
                    assert ((g == 0).sum(-1) >= 2).all(), (step, k)
            zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
            assert sparsity[step] == pytest.approx(zeros)
        if method == "nm":
            assert all(sparsity[t] == 0 for t in (1,)) and all(sparsity[t] == 0.5 for t in range(2, 13))
        else:  # the schedule's target at each logged step: masks change at steps 2, 4, 6, 8
            cfg = PruneConfig(method="magnitude", sparsity=0.6, start_step=2, end_step=8, update_every=2)
            for t, s in sparsity.items():
                assert s == pytest.approx(float(sparsity_at(cfg, min(t // 2 * 2, 8), 12)), abs=0.01), t
        assert json.loads((run / "summary.json").read_text())["final_sparsity"] == sparsity[12]

"""muP (model.parametrization mup): the coordinate check, the base width as the standard model, the per-layer
learning rates, and the refusals.

The coordinate check (Tensor Programs V, section 7 / Fig. 5): the same tiny model at widths 32..256 trains a few
Adam steps at one learning rate on the same batches; the RMS of each layer's output is then measured. Under muP it
stays flat across width; under the standard parametrization it grows with the width. Measured (5 steps of AdamW
at lr 1e-2, base width 32; RMS at width 32 / 64 / 128 / 256; the test runs the standard model at 32 and 256 only):
    standard  block 0 output  0.108 / 0.312 / 1.58 / 5.74   block 1  0.148 / 0.514 / 2.22 / 8.55
              logits          0.346 / 0.621 / 1.09 / 1.86   embedding 0.040 / 0.037 / 0.035 / 0.032
    mup       block 0 output  0.108 / 0.086 / 0.081 / 0.076  block 1  0.148 / 0.128 / 0.123 / 0.113
              logits          0.346 / 0.320 / 0.319 / 0.290  embedding 0.040 / 0.041 / 0.043 / 0.043
It measures after training, not at init: muP's claim is that the updates move every layer by a width-independent
amount (at init the logits under muP even shrink somewhat with the width, 0.133 at 32 to 0.082 at 256).
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, Run, learnable_batches, mesh_for, train_run
from models.attention import rope_tables
from models.axes import embedding_lookup, path_name
from models.loss import head_logits
from models.transformer import ModelConfig, init_cache, mup_attention_scale
from optim.chains import OptimConfig, build_optimizer, mup_lr_multipliers
from parallel.errors import UserError
from train.config import Config, apply_overrides
from train.state import model_def

WIDTHS = (32, 64, 128, 256)
BASE = 32
# A constant lr without clipping (its threshold would not scale with the width); weight decay on, so that the
# base-width comparison covers it too.
ADAM = OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, clip_norm=0.0, weight_decay=0.1)
STEPS = 5
HIDDEN = re.compile(r"/(attn/(wq_DNH|wkv_D2KH|wo_NHD)|mlp/(wi_DCF|wo_FD))$")


def mup(cfg: ModelConfig, d_model: int, base: int = BASE) -> ModelConfig:
    return dataclasses.replace(cfg, d_model=d_model, parametrization="mup", mup_base_width=base)


def mup_tx(cfg: ModelConfig, optim: OptimConfig = ADAM):
    """tx_hook for helpers.train_run: the chain a run builds for this model (train/setup.py passes the width)."""
    width_mult = cfg.width_mult if cfg.parametrization == "mup" else None
    return lambda _: build_optimizer(optim, 100, mup_width_mult=width_mult)[0]


def layer_rms(cfg: ModelConfig, params: dict, tokens_BT: np.ndarray) -> dict[str, float]:
    """RMS of the embedding output, each block's output and the logits, from the model's own modules."""

    @jax.jit
    def rms(params, tokens_BT):
        model = model_def(cfg).module(params)
        B, T = tokens_BT.shape
        x_BTD = embedding_lookup(model.embed_VD[...], tokens_BT)
        acts = {"embedding": x_BTD}
        rope = rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), cfg.head_size, cfg.rope_theta)
        for i, block in enumerate(model.blocks):
            x_BTD = block(x_BTD, None, rope, None)[0]
            acts[f"block {i}"] = x_BTD
        acts["logits"] = head_logits(model.final_norm(x_BTD), model.head_weights())
        return {k: jnp.sqrt(jnp.mean(jnp.square(v))) for k, v in acts.items()}

    return {k: float(v) for k, v in rms(params, jnp.asarray(tokens_BT)).items()}


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, int], tuple[Run, dict[str, float]]]:
    """(parametrization, width) -> (the run of STEPS Adam steps through the train step, activation RMS per layer
    after it on a held-out batch). Same data, same lr; the standard model only at the ends (each run compiles)."""
    batches = learnable_batches(STEPS + 1, 8, 16)
    out = {}
    for name, widths in (("mup", WIDTHS), ("standard", (WIDTHS[0], WIDTHS[-1]))):
        for width in widths:
            cfg = mup(TINY, width) if name == "mup" else dataclasses.replace(TINY, d_model=width)
            run = train_run(mesh_for(), batches[:STEPS], cfg, ADAM, tx_hook=mup_tx(cfg))
            out[name, width] = run, layer_rms(cfg, run.params, batches[-1]["inputs"])
    return out


def test_coordinate_check_flat_under_mup(runs):
    # measured spreads (max / min over widths 32..256): at most 1.42 (block 0); the standard model's are 5-58
    rms = {w: runs["mup", w][1] for w in WIDTHS}
    for layer in rms[BASE]:
        values = [rms[w][layer] for w in WIDTHS]
        assert max(values) / min(values) < 2.0, (layer, rms)


def test_coordinate_check_grows_under_standard(runs):
    # the control: were muP switched off (or ignored by the optimizer), this is what the check above would see
    small, large = runs["standard", WIDTHS[0]][1], runs["standard", WIDTHS[-1]][1]
    assert large["logits"] / small["logits"] > 3.0, (small, large)  # measured 5.4
    assert large["block 1"] / small["block 1"] > 10.0, (small, large)  # measured 58


def test_base_width_is_the_standard_model(runs):
    """At width_mult 1 muP is the standard model to the bit: init, forward, and the optimizer's update (weight
    decay included) over STEPS steps through the run's own train step."""
    at_base = mup(TINY, BASE)
    assert at_base.width_mult == 1.0 and mup_attention_scale(at_base) == 1 / np.sqrt(TINY.head_size)
    got, want = runs["mup", BASE][0], runs["standard", BASE][0]
    np.testing.assert_array_equal(got.losses, want.losses)
    np.testing.assert_array_equal(got.grad_norms, want.grad_norms)
    jax.tree.map(np.testing.assert_array_equal, got.init_params, want.init_params)
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


def test_lr_multipliers_are_one_over_width_mult_on_the_hidden_matrices():
    # every kind of parameter: biases, layernorm, learned positions, an untied head; and a scanned stack
    for scan in (False, True):
        cfg = mup(dataclasses.replace(TINY, use_bias=True, norm="layernorm", positions="learned",
                                      tie_embeddings=False, scan_layers=scan), 128)
        shapes = model_def(cfg).param_shapes()
        got = {path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(mup_lr_multipliers(shapes, 4.0))[0]}
        hidden = {p for p in got if HIDDEN.search("/" + p)}
        assert len(hidden) == (5 if scan else 10), sorted(got)
        assert {p: m for p, m in got.items() if m != 1.0} == {p: 0.25 for p in hidden}


def test_adam_update_is_scaled_per_layer_weight_decay_included():
    """The chain's update under muP is the standard AdamW update times 1/width_mult on the hidden matrices only."""
    cfg = mup(TINY, 128)
    rng = np.random.default_rng(0)
    params, grads = (jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), model_def(cfg).param_shapes())
                     for _ in range(2))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=0.0)
    updates = {}
    for width_mult in (None, cfg.width_mult):
        tx = build_optimizer(optim, 10, mup_width_mult=width_mult)[0]
        updates[width_mult] = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(grads, params)
    flat = jax.tree_util.tree_flatten_with_path(updates[None])[0]
    for (path, want), got in zip(flat, jax.tree.leaves(updates[cfg.width_mult])):
        factor = 0.25 if HIDDEN.search("/" + path_name(path)) else 1.0
        np.testing.assert_allclose(got, want * factor, rtol=1e-6, err_msg=path_name(path))
    # A run's own chain (train.setup.optimizer, what `meshforge train --model.parametrization mup` builds) is it.
    from train.config import Config, TrainConfig
    from train.setup import optimizer

    tx = optimizer(Config(model=cfg, optim=optim, train=TrainConfig(steps=10)), model_def(cfg))[0]
    run = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
    for got, want in zip(jax.tree.leaves(run), jax.tree.leaves(updates[cfg.width_mult])):
        np.testing.assert_array_equal(got, want)


def test_mup_forward_and_cached_forward_agree():
    """Generation (the KV-cache attention) uses the same 1/head_dim scale and logit multiplier as training."""
    cfg = mup(TINY, 128)
    model = model_def(cfg).module(model_def(cfg).init_params(0))
    tokens_BT = jnp.asarray(learnable_batches(1, 2, 16)[0]["inputs"])
    full = model(tokens_BT)
    cached, _ = model(tokens_BT, cache=init_cache(cfg, 2, 16), cache_starts_B=jnp.zeros((2,), jnp.int32))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
    assert mup_attention_scale(cfg) == pytest.approx(math.sqrt(cfg.head_size / 4) / cfg.head_size)


def test_refusals():
    with pytest.raises(ValueError, match=r"model\.mup_base_width"):
        ModelConfig(parametrization="mup")
    with pytest.raises(UserError, match=r"model\.mup_base_width"):
        apply_overrides(Config(), {"model.parametrization": "mup"})
    with pytest.raises(ValueError, match=r"model\.parametrization"):
        dataclasses.replace(mup(TINY, 64), moe_experts=4)
    with pytest.raises(ValueError, match=r"model\.parametrization"):
        dataclasses.replace(mup(TINY, 64), lora_rank=4)
    for name in ("lamb", "sgd"):
        with pytest.raises(UserError, match=r"^optim\.name: " + name):
            build_optimizer(OptimConfig(name=name), 10, mup_width_mult=2.0)


def test_hf_export_refuses_a_mup_model(tmp_path):
    pytest.importorskip("safetensors")
    from interop.hf_export import export_hf

    with pytest.raises(UserError, match=r"^model\.parametrization: "):
        export_hf({}, mup(TINY, 64), tmp_path / "out")
    assert not (tmp_path / "out").exists()

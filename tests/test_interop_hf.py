"""HF interop parity: tiny random transformers models (GPT-2, Llama GQA tied/untied, Qwen2, Qwen3) imported into
meshforge give HF's logits on a 576-token prompt, on 1 device and on 8 with fsdp x tensor x data; exported back,
from_pretrained gives the same weights and logits; meshforge-native models export as the family that fits.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")

from helpers import mesh_for  # noqa: E402
from interop_helpers import CASES, VOCAB, build_hf, hf_logits, load_hf, prompt  # noqa: E402

from interop.families import LLAMA, family_for_model, padded_vocab, t  # noqa: E402
from interop.hf_export import export_hf  # noqa: E402
from interop.hf_import import Checkpoint, hf_model_config, load_hf_params, read_hf_config  # noqa: E402
from interop.layout import View, interleave_perm  # noqa: E402
from models.transformer import ModelConfig  # noqa: E402
from parallel.errors import UserError  # noqa: E402
from parallel.rules import activate  # noqa: E402
from train.state import model_def, param_shardings  # noqa: E402

TOL = 1e-4  # float32 logits, |logit| up to ~5; measured max differences are ~1e-5
BASE = ModelConfig(dtype="float32", attention_impl="xla")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """case -> (folder, HF model, HF logits on the prompt), built once per module."""
    out, tokens = {}, prompt()
    for i, case in enumerate(CASES):
        folder = tmp_path_factory.mktemp(case)
        model = build_hf(case, folder, seed=i)
        out[case] = (folder, model, hf_logits(model, tokens))
    return out


def meshforge_logits(folder, mesh, base=BASE, tokens=None):
    """(params, logits over the real vocabulary) of the folder imported onto mesh."""
    tokens = prompt() if tokens is None else tokens
    cfg = hf_model_config(folder, base)
    mdef = model_def(cfg)
    with activate(mesh):
        params = load_hf_params(folder, mdef, param_shardings(mdef, mesh))
        logits = jax.jit(mdef.apply)(params, tokens)
    return cfg, params, np.asarray(logits)[..., :VOCAB]


@pytest.fixture(scope="module")
def imported(hf):
    """case -> (cfg, params, logits) imported on one device."""
    return {case: meshforge_logits(folder, mesh_for(data=1)) for case, (folder, _, _) in hf.items()}


@pytest.mark.parametrize("case", CASES)
def test_import_matches_hf_on_one_device(hf, imported, case):
    _, _, want = hf[case]
    cfg, params, got = imported[case]
    assert cfg.vocab_size == padded_vocab(VOCAB) == 256
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    embed = np.asarray(params["embed_VD"])
    assert not embed[VOCAB:].any() and embed[:VOCAB].any()  # padded rows are zeros


def test_config_keys_reach_the_model(imported):
    llama, qwen3, gpt2 = imported["llama_untied"][0], imported["qwen3"][0], imported["gpt2"][0]
    assert (llama.rope_theta, llama.norm_eps, llama.kv_heads, llama.tie_embeddings) == (5000.0, 1e-6, 2, False)
    assert imported["llama_tied"][0].tie_embeddings
    assert (qwen3.head_dim, qwen3.qk_norm, imported["qwen2"][0].qkv_bias) == (32, True, True)
    assert (gpt2.positions, gpt2.norm, gpt2.mlp, gpt2.use_bias, gpt2.max_seq_len) == ("learned", "layernorm", "gelu",
                                                                                      True, 640)
    assert llama.dtype == "float32" and llama.attention_impl == "xla"  # training fields kept from the base


def test_import_matches_hf_on_8_devices_fsdp_tensor_scan(hf, monkeypatch):
    """Every family on data=2 x fsdp=2 x tensor=2 with stacked (scanned) layers; each device's callback reads
    only its own slice of a sharded tensor."""
    reads = []
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, sl: reads.append((name, sl)) or get(self, name, sl))
    mesh = mesh_for(data=2, fsdp=2, tensor=2)
    for case, (folder, _, want) in hf.items():
        cfg, params, got = meshforge_logits(folder, mesh, dataclasses.replace(BASE, scan_layers=True))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=case)
        wq = params["blocks"]["attn"]["wq_DNH"]
        assert wq.shape[0] == 2 and wq.sharding.shard_shape(wq.shape) == (2, 32, 2, cfg.head_size)
    embed_rows = [sl[0] for name, sl in reads if name.endswith("wte.weight") or name.endswith("embed_tokens.weight")]
    assert embed_rows and all(s.stop - s.start <= 128 for s in embed_rows)  # half of the 256 padded rows at most


@pytest.mark.parametrize("case", CASES)
def test_export_roundtrip_gives_hf_weights_and_logits(hf, imported, tmp_path, case):
    folder, model, _ = hf[case]
    cfg, params, logits = imported[case]
    export_hf(params, cfg, tmp_path, hf_config=read_hf_config(folder))
    back = load_hf(tmp_path)
    want_sd, got_sd = model.state_dict(), back.state_dict()
    assert set(got_sd) == set(want_sd)
    for name, w in want_sd.items():
        np.testing.assert_array_equal(got_sd[name].numpy(), w.numpy(), err_msg=name)
    np.testing.assert_allclose(hf_logits(back, prompt()), logits, rtol=0, atol=TOL)


NATIVE = {
    "llama": ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, positions="rope",
                         norm="rmsnorm", mlp="swiglu", rope_theta=20_000.0, norm_eps=1e-6, tie_embeddings=False,
                         max_seq_len=640, dtype="float32", attention_impl="xla"),
    "gpt2": ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, positions="learned", norm="layernorm",
                        mlp="gelu", use_bias=True, max_seq_len=640, dtype="float32", attention_impl="xla",
                        scan_layers=True),
    "qwen3": ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                         qk_norm=True, norm="rmsnorm", mlp="swiglu", max_seq_len=640, dtype="float32",
                         attention_impl="xla"),
}


def tiny_bpe():
    from data.tokenize import BPETokenizer

    text = "the quick brown fox jumps over the lazy dog; " * 20
    return BPETokenizer.train([[text]], vocab_size=300)


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_model_exports_as_its_family(tmp_path, name):
    """A model meshforge trained itself: exported (with its BPE tokenizer, weights in several shards) it loads in
    transformers with equal logits, and imports back."""
    cfg = NATIVE[name]
    mdef = model_def(cfg)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32),
                          mdef.init_params(0))  # norms and biases away from 1 and 0
    tok = tiny_bpe()
    assert tok.vocab_size < cfg.vocab_size  # the model's rows past the tokenizer's are padding, dropped on export
    export_hf(params, cfg, tmp_path, tokenizer=tok.to_json(), vocab_size=tok.vocab_size, max_shard_bytes=100_000)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family_for_model(cfg).model_type
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    tokens = np.random.default_rng(2).integers(0, tok.vocab_size, (2, 520)).astype(np.int32)
    want = np.asarray(jax.jit(mdef.apply)(params, tokens))[..., :tok.vocab_size]
    np.testing.assert_allclose(hf_logits(load_hf(tmp_path), tokens), want, rtol=0, atol=TOL)

    from transformers import AutoTokenizer

    text = "the lazy fox"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tok.encode(text).tolist()

    back_cfg = hf_model_config(tmp_path, dataclasses.replace(cfg, vocab_size=0))
    back_def = model_def(back_cfg)
    back = load_hf_params(tmp_path, back_def, param_shardings(back_def, mesh_for(data=1)))
    got = np.asarray(jax.jit(back_def.apply)(back, tokens))[..., :tok.vocab_size]
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_bare_model_names_load(hf, imported, tmp_path):
    """The original gpt2 upload names tensors without 'transformer.' and carries attention-mask buffers."""
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(hf["gpt2"][0], tmp_path / "m")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = np.ones((1, 1, 640, 640), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    got, want = load(folder), imported["gpt2"][1]
    jax.tree.map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------------------------------------- bad input

def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def copy_folder(src, dst, config_edit=None):
    import shutil

    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit,key", [
    (lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral"), "architectures"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
])
def test_unsupported_config_is_one_line_naming_the_key(hf, tmp_path, edit, key):
    folder = copy_folder(hf["llama_untied"][0], tmp_path / "m", edit)
    with pytest.raises(UserError) as err:
        hf_model_config(folder, BASE)
    assert f"`{key}`" in one_line(err)


def test_sliding_window_is_refused(hf, tmp_path):
    folder = copy_folder(hf["qwen2"][0], tmp_path / "m", lambda c: c.update(use_sliding_window=True,
                                                                               sliding_window=128))
    with pytest.raises(UserError) as err:
        hf_model_config(folder, BASE)
    assert "`use_sliding_window`" in one_line(err)


def load(folder):
    cfg = hf_model_config(folder, BASE)
    mdef = model_def(cfg)
    return load_hf_params(folder, mdef, param_shardings(mdef, mesh_for(data=1)))


def test_missing_safetensors(hf, tmp_path):
    folder = copy_folder(hf["gpt2"][0], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError) as err:
        load(folder)
    assert "no *.safetensors" in one_line(err) and str(folder) in str(err.value)


def test_missing_tensor_is_named(hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(hf["qwen2"][0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        load(folder)
    assert "model.layers.1.self_attn.k_proj.bias is missing" in one_line(err)


def test_shape_disagreeing_with_config_is_named(hf, tmp_path):
    folder = copy_folder(hf["llama_untied"][0], tmp_path / "m", lambda c: c.update(intermediate_size=128))
    with pytest.raises(UserError) as err:
        load(folder)
    msg = one_line(err)
    assert "model.layers.0.mlp.gate_proj.weight has shape [96, 64]" in msg and "[128, 64]" in msg


@pytest.mark.parametrize("change,key", [
    (dict(positions="learned"), "model.norm"),  # learned positions with RMSNorm: neither GPT-2 nor Llama
    (dict(mlp="gelu"), "model.mlp"),
    (dict(moe_experts=4), "model.moe_experts"),
    (dict(qkv_bias=True, qk_norm=True), "model.qkv_bias"),
])
def test_native_config_no_family_fits(change, key):
    cfg = dataclasses.replace(NATIVE["llama"], **change)
    with pytest.raises(UserError) as err:
        family_for_model(cfg)
    assert one_line(err).startswith(key + ":")


# ------------------------------------------------------------------------------------------- RoPE layouts

def rope_np(x_TH: np.ndarray, interleaved: bool, theta: float = 100.0) -> np.ndarray:
    """Reference RoPE on (T, H): pairs (2i, 2i+1) when interleaved, else halves (i, i + H/2)."""
    T, H = x_TH.shape
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, H, 2) / H)
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = (x_TH[:, 0::2], x_TH[:, 1::2]) if interleaved else (x_TH[:, :H // 2], x_TH[:, H // 2:])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = np.empty_like(x_TH)
    if interleaved:
        out[:, 0::2], out[:, 1::2] = ra, rb
    else:
        out[:, :H // 2], out[:, H // 2:] = ra, rb
    return out


def test_interleaved_rope_layout_permutes_q_and_k_only():
    """A family storing interleaved RoPE pairs: import permutes q/k rows so the model's rotate-half RoPE gives the
    same attention scores; export permutes back (identity round trip); v rows are left alone."""
    D, K, H = 8, 2, 8
    sizes = {"d": D, "k": K, "h": H, "n": K}
    rng = np.random.default_rng(0)
    k_hf, v_hf = rng.normal(size=(K * H, D)), rng.normal(size=(K * H, D))
    row = t("wkv", ("k.weight", "v.weight"), "(k h) d", "d s k h", rope=("s", 0))
    view = View(row, sizes, (D, 2, K, H), None, interleaved=True)
    hf = {"k.weight": k_hf, "v.weight": v_hf}
    full = tuple(slice(None) for _ in range(4))
    wkv = view.read(full, lambda name, sl: hf[name][sl], np.float64)
    np.testing.assert_array_equal(wkv[:, 1], v_hf.reshape(K, H, D).transpose(2, 0, 1))  # v untouched
    assert not np.array_equal(wkv[:, 0], k_hf.reshape(K, H, D).transpose(2, 0, 1))
    # a partial box (one kv head, as a tensor-parallel device holds) reads the same values
    np.testing.assert_array_equal(view.read((slice(None), slice(None), slice(1, 2), slice(None)),
                                            lambda name, sl: hf[name][sl], np.float64), wkv[:, :, 1:2])
    back = {}
    view.write(wkv, lambda name: back.setdefault(name, np.zeros((K * H, D))))
    np.testing.assert_array_equal(back["k.weight"], k_hf)
    np.testing.assert_array_equal(back["v.weight"], v_hf)
    # attention scores q.k agree: interleaved RoPE on HF rows == rotate-half RoPE on the imported rows
    x_TD, q_hf = rng.normal(size=(64, D)), rng.normal(size=(H, D))
    q_view = View(t("wq", "q.weight", "(n h) d", "d n h", rope=True), {**sizes, "n": 1}, (D, 1, H), None,
                  interleaved=True)
    wq = q_view.read((slice(None),) * 3, lambda name, sl: q_hf[sl], np.float64)[:, 0]
    want = rope_np(x_TD @ q_hf.T, True) @ rope_np(x_TD @ k_hf[:H].T, True).T
    got = rope_np(x_TD @ wq, False) @ rope_np(x_TD @ wkv[:, 0, 0], False).T
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(interleave_perm(8), [0, 2, 4, 6, 1, 3, 5, 7])
    assert LLAMA.interleaved is False  # HF's own Llama layout is rotate-half, as the model

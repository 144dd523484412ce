"""Transfer learning end to end through the CLI: a tiny random HF Llama folder -> LoRA SFT run (train.init_from)
-> export as an HF folder (adapters merged) and as a PEFT adapter -> transformers / peft give the run's logits.
Also: only adapters are in the optimizer state, the base weights stay frozen, and bad inputs are one line."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from hf_tokenizer_helpers import write_hf_folder
from helpers import meshforge

pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 512  # the tiny BPE has 400 ids
ARGS = ["--train.steps", 6, "--train.batch_size", 8, "--train.seq_len", 64, "--train.eval_every", 0,
        "--train.eval_batches", 1, "--train.eval_batch_size", 8, "--train.checkpoint_every", 0, "--log.progress",
        "none", "--log.tensorboard", "false", "--model.lora_rank", 4, "--model.lora_alpha", 16,
        "--optim.lr", 0.05, "--optim.warmup_steps", 0, "--data.sft_template", "Q: {prompt}\nA: "]


def tiny_llama(folder):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from interop_helpers import randomize

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model, 0)
    model.save_pretrained(folder)
    write_hf_folder(folder)  # tokenizer.json + tokenizer_config.json beside config.json
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    base = tiny_llama(root / "base")
    data = root / "pairs.jsonl"
    words = ["thee", "thou", "lord", "king", "night", "day", "love", "death"]
    with data.open("w") as f:
        for i in range(200):
            a, b = words[i % 8], words[(i * 3) % 8]
            f.write(json.dumps({"prompt": f"{a} {b}", "response": f"{b} {a}"}) + "\n")
    run = root / "run"
    r = meshforge("train", "experiments/finetune_lora.py", "--workdir", run, "--train.init_from", base,
                  "--data.path", data, "--data.cache_dir", root / "cache", *ARGS)
    assert r.returncode == 0, r.stderr
    return base, run, root


def _checkpoint_leaves(run, part: str) -> dict[str, tuple]:
    import orbax.checkpoint as ocp

    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    meta = ocp.StandardCheckpointer().metadata(run / "checkpoints" / str(step) / "state").item_metadata
    flat = jax.tree_util.tree_flatten_with_path(meta[part])[0]
    return {jax.tree_util.keystr(p): tuple(m.shape) for p, m in flat}


def test_lora_trains_only_adapters(lora_run):
    _, run, _ = lora_run
    params = _checkpoint_leaves(run, "params")
    adapters = sum(int(np.prod(s)) for k, s in params.items() if "_lora" in k)
    total = sum(int(np.prod(s)) for s in params.values())
    assert 0 < adapters < 0.1 * total
    moments = sum(int(np.prod(s)) for s in _checkpoint_leaves(run, "opt_state").values() if len(s) > 0)
    assert moments == 2 * adapters  # Adam's mu and nu, for the adapters only


def _forward(run, tokens):
    """The run's own (unmerged) forward and the merged one, both in meshforge."""
    from models.lora import merge
    from train.config import from_dict
    from train.restore import restore_for_inference
    from train.state import model_def
    import dataclasses

    cfg = from_dict(json.loads((run / "config.json").read_text()))
    setup, params, _ = restore_for_inference(cfg, run)
    m = setup.cfg.model
    unmerged = np.asarray(setup.mdef.apply(params, tokens))
    plain = model_def(dataclasses.replace(m, lora_rank=0))
    merged = np.asarray(plain.apply(merge(jax.device_get(params), m.lora_alpha / m.lora_rank), tokens))
    return params, unmerged, merged


def test_exports_match_the_run(lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, run, root = lora_run
    tokens = np.random.default_rng(0).integers(0, 400, (2, 200)).astype(np.int32)
    params, unmerged, merged = _forward(run, tokens)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)  # float32 rounding of W + BA
    # the base weights did not move; the adapters did
    from safetensors.numpy import load_file

    hf = load_file(str(base / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(params["embed_VD"])[:VOCAB], hf["model.embed_tokens.weight"])
    assert np.abs(np.asarray(params["blocks"][0]["attn"]["wq_DNH_lora"]["wb"])).max() > 0

    r = meshforge("export", run, "--format", "hf", "--out", root / "hf")
    assert r.returncode == 0, r.stderr
    r = meshforge("export", run, "--format", "peft", "--out", root / "peft")
    assert r.returncode == 0, r.stderr
    t = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
        np.testing.assert_allclose(exported(t).logits.numpy(), unmerged[..., :VOCAB], atol=1e-4)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        adapted = PeftModel.from_pretrained(base_model, root / "peft").eval()
        np.testing.assert_allclose(adapted(t).logits.numpy(), unmerged[..., :VOCAB], atol=1e-4)
    # a second export to the same folder is refused: nothing is overwritten
    r = meshforge("export", run, "--format", "hf", "--out", root / "hf")
    assert r.returncode == 2 and "--out" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _unsupported(base, folder):
    import shutil

    shutil.copytree(base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"],
                                                    "model_type": "mamba"}))
    return folder


def _no_weights(base, folder):
    import shutil

    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.mark.parametrize("override, key", [
    (["--model.lora_targets", "nothing_here"], "model.lora_targets"),
    (["--train.trainable", "no_such_param", "--model.lora_rank", 0], "train.trainable"),
    (_unsupported, "MambaForCausalLM"),
    (_no_weights, ".safetensors"),
])
def test_bad_fine_tuning_input_is_one_line(lora_run, tmp_path, override, key):
    base, _, root = lora_run
    if callable(override):
        base, override = override(base, tmp_path / "folder"), []
    r = meshforge("train", "experiments/finetune_lora.py", "--workdir", tmp_path / "run", "--train.init_from",
                  base, "--data.path", root / "pairs.jsonl", "--data.cache_dir", root / "cache", *ARGS, *override)
    assert r.returncode == 2, r.stderr
    assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["gpt2", "qwen3"])
def test_peft_export_of_other_families(case, tmp_path):
    """Random adapters on a tiny HF GPT-2 (fused c_attn: one wider PEFT adapter, Conv1D layout) and Qwen3
    (head_dim != d_model / heads) export to PEFT folders that peft loads with meshforge's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from interop.hf_import import hf_model_config, load_hf_params
    from interop.peft_export import export_peft
    from interop_helpers import VOCAB as HF_VOCAB, build_hf
    from models.transformer import ModelConfig
    from parallel.mesh import MeshConfig, make_mesh
    from train.state import model_def, param_shardings

    build_hf(case, tmp_path / "base")
    base = ModelConfig(lora_rank=4, lora_alpha=8.0, dtype="float32")
    mdef = model_def(hf_model_config(tmp_path / "base", base))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    fresh = jax.device_get(mdef.init_params(1))
    rng = np.random.default_rng(0)
    # B starts at zero; give every adapter a visible update
    fresh = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.05, x.shape).astype(np.float32) if jax.tree_util.keystr(p).endswith("['wb']")
        else x, fresh)
    params = jax.device_get(load_hf_params(tmp_path / "base", mdef, param_shardings(mdef, mesh), others=fresh))
    export_peft(params, mdef.cfg, tmp_path / "peft")
    tokens = rng.integers(0, HF_VOCAB, (2, 96)).astype(np.int32)
    ours = np.asarray(mdef.apply(params, tokens))[..., :HF_VOCAB]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
        before = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        adapted = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
        got = adapted(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(before - ours).max() > 1e-2  # the adapters change the output, so the comparison means something
    np.testing.assert_allclose(got, ours, atol=1e-4)


def test_resume_needs_no_source_and_export_works_from_anywhere(lora_run, tmp_path):
    """A fine-tuning run resumes from its own checkpoints after its init_from folder is gone, and exports from
    another directory (where neither the experiment file nor the training data are)."""
    import shutil

    base, _, root = lora_run
    shutil.copytree(base, tmp_path / "src")
    common = ["train", "experiments/finetune_lora.py", "--workdir", tmp_path / "run", "--train.init_from",
              tmp_path / "src", "--data.path", root / "pairs.jsonl", "--data.cache_dir", root / "cache", *ARGS]
    r = meshforge(*common, "--train.steps", 2)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(tmp_path / "src")
    r = meshforge(*common, "--train.steps", 4)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_step"] == 4 and summary["steps_this_run"] == 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = meshforge("export", tmp_path / "run", "--format", "peft", "--out", tmp_path / "peft", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_sample_from_an_hf_folder(lora_run):
    """`meshforge sample --from DIR` on an HF folder: its weights and tokenizer, greedy, through the CLI."""
    base, _, _ = lora_run
    r = meshforge("sample", "--from", base, "--prompt", "thee thou", "--temperature", 0, "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("thee thou") and len(r.stdout.strip()) > len("thee thou")


def test_trainable_regex_trains_only_what_it_finds():
    """train.trainable 'final_norm': one step moves the final norm and nothing else; the optimizer holds moments
    for it alone."""
    from helpers import TINY, mesh_for
    from optim.chains import OptimConfig, build_optimizer
    from optim.trainable import select
    from parallel.mesh import batch_sharding
    from parallel.rules import activate
    from train.state import init_state, model_def, state_shardings
    from train.step import make_train_step

    mdef = model_def(TINY, "final_norm")
    tx, schedule = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10,
                                   select(mdef.logical_axes(), mdef.trainable))
    mesh = mesh_for(data=1)
    shardings = state_shardings(tx, mdef, mesh)
    with activate(mesh):
        state = init_state(tx, mdef, shardings, seed=0)
        before = jax.device_get(state["params"])
        moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
        step = make_train_step(mdef, tx, schedule, accum_steps=1, seed=0, state_shardings=shardings,
                               batch_sharding=batch_sharding(mesh))
        tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 17)).astype(np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 16), np.float32)}
        state, _ = step(state, batch)
    after = jax.device_get(state["params"])
    assert moments == 2 * TINY.d_model  # mu and nu of final_norm/scale_D
    changed = {jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                                            jax.tree.leaves(after)) if not np.array_equal(a, b)}
    assert changed == {"['final_norm']['scale_D']"}

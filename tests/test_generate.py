"""KV-cache generation (train/generate.py): greedy tokens equal transformers' `generate` on tiny random Llama (GQA)
and GPT-2 (learned positions) models; prompt lengths within a bucket do not recompile; prefill + cached decode
steps give the full forward's logits (left-padded rows too); sampling rules; EOS; a sharded mesh gives the same
tokens as one device.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")

from helpers import mesh_for  # noqa: E402
from interop_helpers import VOCAB, build_hf, hf_config, randomize  # noqa: E402

from interop.hf_import import hf_model_config, load_hf_params  # noqa: E402
from models.transformer import ModelConfig, cache_position  # noqa: E402
from parallel.rules import activate  # noqa: E402
from train.generate import MIN_BUCKET, Generator, Sampling, bucket, pick  # noqa: E402
from train.state import ModelDef, model_def, param_shardings  # noqa: E402

BASE = ModelConfig(dtype="float32", attention_impl="xla")
NEW = 64  # new tokens in the parity test
LENS = (37, 21)  # two prompt lengths in one bucket (64): the shorter row is left-padded by 43
LOGITS_ATOL = 1e-5


def build_gpt2(folder: Path, seed: int = 0):
    """A random GPT-2 with an untied head and embeddings 5x stronger than the blocks' MLP output. A tied random
    GPT-2 repeats one token forever (its last hidden state is nearest its own input embedding, plus a constant
    direction from the MLP), so equal tokens would prove little; this one's greedy text depends on every
    position."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config("gpt2")
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp.c_proj" in name:
                p.mul_(0.2)
            if "wte" in name or "wpe" in name:
                p.mul_(5.0)
    model.save_pretrained(folder)
    return model


@dataclasses.dataclass
class Loaded:
    folder: Path
    hf: Any  # the transformers model
    mdef: ModelDef
    params: dict
    gen: Generator  # one device, no end-of-sequence token


def load(folder: Path, mesh, **base) -> tuple[ModelDef, dict, dict]:
    mdef = model_def(hf_model_config(folder, dataclasses.replace(BASE, **base)))
    shardings = param_shardings(mdef, mesh)
    with activate(mesh):
        params = load_hf_params(folder, mdef, shardings)
    return mdef, params, shardings


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Loaded]:
    out = {}
    for case, build in (("llama", lambda f: build_hf("llama_untied", f, seed=0)), ("gpt2", build_gpt2)):
        folder = tmp_path_factory.mktemp(case)
        hf = build(folder)
        hf.generation_config.eos_token_id = None  # neither side stops early: 64 tokens each
        mesh = mesh_for(data=1)
        mdef, params, shardings = load(folder, mesh)
        out[case] = Loaded(folder, hf, mdef, params, Generator(mdef, mesh, shardings, vocab_limit=VOCAB, eos_id=None))
    return out


def prompts(lens=LENS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).astype(np.int32) for n in lens]


def hf_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    import torch

    ids = torch.as_tensor(prompt[None], dtype=torch.long)
    # an explicit mask: without one, generate masks out every prompt token equal to pad_token_id
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(prompt):].numpy()


def full_logits(m: Loaded, seq: np.ndarray) -> np.ndarray:
    """Logits (T, V) of one unpadded sequence, over the real vocabulary, from the plain forward (no cache)."""
    return np.asarray(jax.jit(m.mdef.apply)(m.params, seq[None].astype(np.int32)))[0, :, :VOCAB]


# ------------------------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(models, case):
    m = models[case]
    got = m.gen.generate(m.params, prompts(), NEW)
    for p, g in zip(prompts(), got):
        want = hf_greedy(m.hf, p, NEW)
        assert len(want) == NEW and len(g) == NEW
        np.testing.assert_array_equal(g, want, err_msg=f"{case}, prompt of {len(p)} tokens")
        assert len(set(g.tolist())) >= 4  # the model is not stuck on one token, so the comparison means something


# ------------------------------------------------------------------------------------ compilation

def test_prompt_lengths_in_one_bucket_do_not_recompile(models):
    m = models["llama"]
    gen = Generator(m.mdef, m.gen.mesh, m.gen.param_shardings, vocab_limit=VOCAB, eos_id=None)
    assert gen.compiles() == 0
    gen.generate(m.params, prompts([65]), 8)  # warm-up: bucket 128
    warm = gen.compiles()
    assert warm == 2  # one prefill, one decode loop
    lens = [int(n) for n in np.linspace(66, 128, 10)]
    assert len(set(lens)) == 10 and {bucket(n) for n in lens} == {128}
    for i, n in enumerate(lens):
        out = gen.generate(m.params, prompts([n], seed=i), 8 - i % 4)  # new-token counts in one bucket too
        assert len(out[0]) == 8 - i % 4
    assert gen.compiles() == warm, "a prompt length within the warmed-up bucket compiled again"
    assert bucket(20) == 32 and bucket(3) == MIN_BUCKET
    gen.generate(m.params, prompts([20]), 8)  # a new bucket: its own prefill and decode (other cache slots)
    assert gen.compiles() == warm + 2


# ------------------------------------------------------------------------------------ cache == full forward

@pytest.mark.parametrize("case,scan", [("llama", True), ("gpt2", False)])
def test_cached_decode_equals_full_forward(models, case, scan):
    """Prefill a full row and a left-padded row, then feed a fixed continuation one token at a time through the
    cache; each step's logits equal the plain forward over the whole unpadded sequence."""
    src = models[case]
    mesh = mesh_for(data=1)
    mdef, params, shardings = load(src.folder, mesh, scan_layers=scan)  # scanned: the cache is stacked per layer
    m = Loaded(src.folder, src.hf, mdef, params, Generator(mdef, mesh, shardings, vocab_limit=VOCAB, eos_id=None))
    rows, steps = prompts((32, 19), seed=3), 12
    cont_BS = np.random.default_rng(4).integers(0, VOCAB, (2, steps)).astype(np.int32)
    P = bucket(32)
    tokens_BP, starts_B = np.zeros((2, P), np.int32), np.array([P - len(r) for r in rows], np.int32)
    for i, r in enumerate(rows):
        tokens_BP[i, starts_B[i]:] = r

    @jax.jit
    def step(params, cache, tok_B):  # what the decode loop does with each sampled token
        at = cache_position(cache)
        return mdef.apply(params, tok_B[:, None], positions_BT=(at - starts_B)[:, None], cache=cache,
                          cache_starts_B=starts_B)

    with activate(mesh):
        logits_BV, cache = m.gen._prefill(params, tokens_BP, starts_B, np.empty((bucket(P + steps), 0), np.int8))
        got = [np.asarray(logits_BV)]
        for s in range(steps):
            logits_B1V, cache = step(params, cache, cont_BS[:, s])
            got.append(np.asarray(logits_B1V)[:, 0])
    got_BSV = np.stack(got, axis=1)[..., :VOCAB]
    for i, r in enumerate(rows):
        want = full_logits(m, np.concatenate([r, cont_BS[i]]))[len(r) - 1:]
        np.testing.assert_allclose(got_BSV[i], want, rtol=0, atol=LOGITS_ATOL, err_msg=f"row {i} ({len(r)} tokens)")

    # the generator's own loop: its greedy tokens are the argmax of the full forward at every step
    for r, new in zip(rows, m.gen.generate(params, rows, 16)):
        seq = np.concatenate([r, new])
        np.testing.assert_array_equal(full_logits(m, seq)[len(r) - 1:-1].argmax(-1), new)


# ------------------------------------------------------------------------------------ sampling

@pytest.fixture(scope="module")
def greedy(models):
    m = models["llama"]
    return m.gen.generate(m.params, prompts(), 32)


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)],
                         ids=["top_k=1", "top_p=1e-6"])
def test_one_token_rules_equal_greedy(models, greedy, sampling):
    m = models["llama"]
    for seed in (0, 1):
        for g, s in zip(greedy, m.gen.generate(m.params, prompts(), 32, sampling, seed=seed)):
            np.testing.assert_array_equal(s, g)


def test_temperature_sampling_is_seeded_and_stays_in_top_k(models, greedy):
    m = models["llama"]
    rule = Sampling(temperature=2.0, top_k=5)
    a = m.gen.generate(m.params, prompts(), 32, rule, seed=7)
    np.testing.assert_array_equal(np.stack(a), np.stack(m.gen.generate(m.params, prompts(), 32, rule, seed=7)))
    assert not np.array_equal(np.stack(a), np.stack(m.gen.generate(m.params, prompts(), 32, rule, seed=8)))
    ranks = []
    for p, new in zip(prompts(), a):
        logits_TV = full_logits(m, np.concatenate([p, new]))[len(p) - 1:-1]
        order_TV = np.argsort(-logits_TV, axis=-1)
        ranks += [int(np.flatnonzero(order_TV[t] == tok)[0]) for t, tok in enumerate(new)]
    assert max(ranks) < 5, "a token outside the top 5"
    assert sum(r > 0 for r in ranks) >= 8, "temperature 2 should often leave the argmax"
    assert not np.array_equal(np.stack(a), np.stack(greedy))


def test_pick_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0, 0.0])
    logits_1V = np.log(np.maximum(probs, 1e-30))[None].astype(np.float32)
    logits_1V[0, 5] = 10.0  # a padded vocabulary id (vocab_limit 5): never chosen whatever its logit
    keys = jax.random.split(jax.random.key(0), 2000)

    def chosen(s: Sampling) -> set[int]:
        return set(np.asarray(jax.jit(jax.vmap(lambda k: pick(logits_1V, k, s, 5)[0]))(keys)).tolist())

    assert chosen(Sampling(temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert chosen(Sampling(temperature=1.0, top_p=0.85)) == {0, 1, 2}
    assert chosen(Sampling(temperature=1.0, top_p=0.5)) == {0}
    assert chosen(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert chosen(Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert chosen(Sampling()) == {0}  # greedy: the argmax among the real ids


def test_stops_at_eos(models, greedy):
    """EOS = a token greedy decoding writes at step k of row 0 (so it is the argmax there): row 0 ends right after
    it, row 1 runs on, unchanged, to its own first EOS (or the budget)."""
    m = models["llama"]
    g0, g1 = greedy
    k = next(i for i in range(3, len(g0)) if g0[i] not in g0[:i])
    eos = int(g0[k])
    gen = Generator(m.mdef, m.gen.mesh, m.gen.param_shardings, vocab_limit=VOCAB, eos_id=eos)
    r0, r1 = gen.generate(m.params, prompts(), 32)
    np.testing.assert_array_equal(r0, g0[:k + 1])
    hit = np.flatnonzero(g1 == eos)
    np.testing.assert_array_equal(r1, g1[:hit[0] + 1] if len(hit) else g1)
    sampled = gen.generate(m.params, prompts(), 32, Sampling(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(sampled[0], r0)

    # inside the loop a finished row stops sampling (it writes EOS from then on) and the loop ends once every row
    # has finished, instead of running the whole budget and cutting afterwards
    p = prompts()[0]
    P = bucket(len(p))
    with activate(gen.mesh):
        logits_BV, cache = gen._prefill(m.params, np.pad(p, (P - len(p), 0))[None], np.array([P - len(p)], np.int32),
                                        np.empty((bucket(P + 32), 0), np.int8))
        out_BN, _ = gen._decoder(Sampling())(m.params, cache, logits_BV, np.array([P - len(p)], np.int32),
                                             np.empty((32, 0), np.int8), np.int32(32), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out_BN)[0], np.concatenate([r0, np.full(32 - len(r0), eos)]))


def test_bad_requests(models):
    m = models["gpt2"]
    with pytest.raises(ValueError, match="learned positions"):
        m.gen.generate(m.params, prompts([600]), 64)  # 600 + 64 > 640 positions
    with pytest.raises(ValueError, match="at least one token"):
        m.gen.generate(m.params, [np.zeros(0, np.int32)], 4)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


# ------------------------------------------------------------------------------------ sharded

def test_sharded_mesh_gives_one_device_tokens(models):
    """data=2 x fsdp=2 x tensor=2 (conftest gives every test process 8 CPU devices): the 2 prompts are padded to
    4 rows, weights and cache split over fsdp and tensor; the tokens equal the one-device ones."""
    mesh = mesh_for(data=2, fsdp=2, tensor=2)
    for case, m in models.items():
        want = m.gen.generate(m.params, prompts(), 32)
        mdef, params, shardings = load(m.folder, mesh, scan_layers=case == "llama")
        assert params["embed_VD"].sharding.shard_shape(params["embed_VD"].shape) != params["embed_VD"].shape
        gen = Generator(mdef, mesh, shardings, vocab_limit=VOCAB, eos_id=None)
        for w, g in zip(want, gen.generate(params, prompts(), 32)):
            np.testing.assert_array_equal(g, w, err_msg=case)


# ------------------------------------------------------------------------------------ the benchmark command

def test_bench_generate_runs_and_agrees(models, capsys, tmp_path):
    """interop/bench_generate.py on the tiny Llama folder: both sides produce the same tokens; bad flags exit 2."""
    import json

    from interop.bench_generate import main

    out = tmp_path / "bench.json"
    assert main(["--from", str(models["llama"].folder), "--new-tokens", "4", "--prompt-len", "8", "--batches",
                 "1,2", "--repeats", "1", "--torch-threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["same_tokens"] == 1.0 and row["meshforge"]["tokens_per_s"] > 0 and row["ratio"] > 0
    assert "meshforge tok/s" in capsys.readouterr().out
    assert main(["--from", str(models["llama"].folder), "--batches", "0"]) == 2
    assert main(["--from", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_moe_generation_does_not_depend_on_left_padding():
    """A prompt decodes to the same tokens alone and beside a longer prompt (which left-pads it): generation routes
    MoE tokens without capacity drops, so padding never takes an expert slot from a real token."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, moe_experts=4,
                      moe_top_k=2, moe_capacity_factor=1.0, dtype="float32")
    mdef = model_def(cfg)
    mesh = mesh_for(data=1)
    shardings = param_shardings(mdef, mesh)
    params = jax.jit(lambda: mdef.init_params(3), out_shardings=shardings)()
    gen = Generator(mdef, mesh, shardings, vocab_limit=64, eos_id=None)
    short = np.random.default_rng(0).integers(1, 64, 9)

    def last_logits(P: int) -> np.ndarray:  # the prompt left-padded (token 0) to P, through the prefill
        tokens = np.zeros((1, P), np.int32)
        tokens[0, P - len(short):] = short
        with activate(mesh):
            logits, _ = gen._prefill(params, tokens, np.array([P - len(short)], np.int32), np.empty((P, 0), np.int8))
        return np.asarray(logits)[0]

    # 55 identical padding tokens would fill their experts' 32 slots (capacity 1.0) before the prompt's tokens
    np.testing.assert_allclose(last_logits(64), last_logits(16), atol=1e-5)
    alone = gen.generate(params, [short], 12)[0]
    beside = gen.generate(params, [np.arange(40) % 64, short], 12)[1]
    np.testing.assert_array_equal(alone, beside)

"""The sft objective: loss on response tokens only, several examples packed per row, no attention across them."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.config import DataConfig
from data.packed import PackedPipeline
from data.sft import pack_examples
from hf_tokenizer_helpers import write_hf_folder
from models.transformer import ModelConfig, Transformer
from parallel.errors import UserError

TEMPLATE = "Q: {prompt}\nA: "
ROWS = [{"prompt": f"What is {i} plus {i % 7}?", "response": f"It is {i + i % 7}."} for i in range(60)]
SEQ = 128


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(tmp_path, path, **kw) -> DataConfig:
    base = dict(mode="packed", objective="sft", tokenizer="byte", path=str(path), cache_dir=str(tmp_path / "cache"),
                prefetch=0, sft_template=TEMPLATE, val_fraction=0.1)
    return DataConfig(**{**base, **kw})


def segments_of(batch, r):
    """[(segment id, slice of the row's inputs)] of row r, padding left out."""
    seg = batch["segment_ids"][r]
    return [(s, np.flatnonzero(seg == s)) for s in np.unique(seg[seg > 0])]


@pytest.fixture
def pipeline(tmp_path):
    cfg = sft_config(tmp_path, write_jsonl(tmp_path / "qa.jsonl", ROWS))
    p = PackedPipeline(cfg, batch_size=4, seq_len=SEQ, seed=0)
    yield p
    p.close()


def test_only_response_tokens_are_trained_and_examples_share_rows(pipeline):
    src, tok, eos = pipeline.sources[0], pipeline.tokenizer, pipeline.tokenizer.special_id("<eos>")
    n_train = len(ROWS) - 6  # val_fraction 0.1: the last 6 examples
    assert src.n_train < n_train / 2  # packed: at least two examples per row on average
    batch = pipeline.objective(src.train_windows(np.arange(src.n_train)), np.arange(src.n_train))
    seen, trained = [], 0.0
    for r in range(src.n_train):
        segs = segments_of(batch, r)
        assert len(segs) >= 1 and [s for s, _ in segs] == list(range(1, len(segs) + 1))  # distinct ids
        for s, at in segs:
            text = tok.decode(batch["inputs"][r, at])
            prompt, _, answer = text.partition("\nA: ")
            row = ROWS[[f"Q: {x['prompt']}" for x in ROWS].index(prompt)]
            seen.append(row["prompt"])
            w = batch["weights"][r, at]
            # the target of the segment's last input is the <eos> (or the next segment starts there)
            targets = batch["targets"][r, at][w > 0]
            assert tok.decode(targets) == row["response"] + "<eos>"
            assert (w[: len(tok.encode(prompt + "\nA: ")) - 1] == 0).all()  # predicting the prompt: weight 0
            assert set(np.unique(w)) == {0.0, 1.0}
            trained += w.sum()
    assert sorted(seen) == sorted(x["prompt"] for x in ROWS[:n_train])  # every train example once per epoch
    assert trained == sum(len(x["response"]) + 1 for x in ROWS[:n_train])
    assert (batch["weights"][batch["segment_ids"] == 0] == 0).all()
    assert max(len(segments_of(batch, r)) for r in range(src.n_train)) >= 3
    assert eos in batch["targets"][0]


def test_stream_is_deterministic_and_resumable(pipeline, tmp_path):
    again = PackedPipeline(pipeline.cfg, batch_size=4, seq_len=SEQ, seed=0)  # from the cache
    again.restore(pipeline.state(5))
    for step in (5, 6, 40):  # 40: past the first epoch (a fresh permutation)
        a, b = pipeline.host_batch(step, np.arange(4)), again.host_batch(step, np.arange(4))
        assert all(np.array_equal(a[k], b[k]) for k in a)
    val = list(pipeline.eval_batches(4, np.arange(4)))
    assert sum(b["weights"].sum() for b in val) == sum(len(x["response"]) + 1 for x in ROWS[-6:])
    again.close()


def test_packing_is_best_fit_and_cuts_long_examples(tmp_path, capfd):
    row, start, n_rows = pack_examples(np.array([60, 50, 30, 40, 200, 10]), 100)
    # 30 goes to the tightest row that holds it (0), 10 to the lowest of two equally tight rows
    assert n_rows == 3 and list(row) == [0, 1, 0, 1, 2, 0] and list(start) == [0, 0, 60, 50, 0, 90]
    rows = ROWS[:10] + [{"prompt": "x" * 300, "response": "long"}] + ROWS[10:20]
    p = PackedPipeline(sft_config(tmp_path, write_jsonl(tmp_path / "long.jsonl", rows)), 2, SEQ, 0)
    assert "1 of 21 sft examples" in capfd.readouterr().err
    w = p.sources[0].train_windows(np.arange(p.sources[0].n_train))
    assert (w.segment_ids > 0).sum() == sum(len(TEMPLATE.format(prompt=x["prompt"]) + x["response"]) + 1
                                            for x in rows[:19] if x is not rows[10]) + SEQ + 1


def test_packed_examples_do_not_attend_across_each_other(pipeline):
    """The real model on a packed row: the second example's logits equal those of the example run alone."""
    cfg = ModelConfig(vocab_size=pipeline.tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                      max_seq_len=SEQ, dtype="float32")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    batch = pipeline.host_batch(0, np.arange(1))
    (_, first), (_, second) = segments_of(batch, 0)[:2]
    forward = nnx.jit(lambda m, x, s, q: m(x, segment_ids_BT=s, positions_BT=q))
    run = lambda x, s, q: np.asarray(forward(model, jnp.asarray(x), jnp.asarray(s), jnp.asarray(q)))  # noqa: E731
    packed = run(batch["inputs"], batch["segment_ids"], batch["positions"])[0, second]
    np.testing.assert_array_equal(batch["positions"][0, second], np.arange(len(second)))
    n = len(second)  # alone: the example at the start of a row of padding (same shape: one compilation)
    alone_tokens = np.full_like(batch["inputs"], pipeline.tokenizer.special_id("<pad>"))
    alone_tokens[0, :n] = batch["inputs"][0, second]
    alone_segments = np.where(np.arange(SEQ) < n, 1, 0)[None].astype(np.int32)
    alone = run(alone_tokens, alone_segments, np.arange(SEQ, dtype=np.int32)[None])[0, :n]
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5)
    # one segment over the row: the first example leaks in (so the comparison above can fail)
    leak = run(batch["inputs"], np.ones_like(batch["segment_ids"]), batch["positions"])[0, second]
    assert np.abs(leak - alone).max() > 1e-3


def test_chat_template_trains_only_assistant_content(tmp_path):
    folder = write_hf_folder(tmp_path / "model")
    chats = [{"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": f"Name {i}?"}, {"role": "assistant", "content": f"Lear {i}."},
                           {"role": "user", "content": "And?"}, {"role": "assistant", "content": f"Fool {i}."}]}
             for i in range(12)]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    p = PackedPipeline(sft_config(tmp_path, path, tokenizer="bpe", tokenizer_path=str(folder), sft_template=""),
                       2, 128, 0)
    tok = p.tokenizer
    rows = p.sources[0].train_windows(np.arange(p.sources[0].n_train))
    batch = p.objective(rows, np.zeros(p.sources[0].n_train))
    found = 0
    for r in range(len(batch["inputs"])):
        for s, at in segments_of(batch, r):
            full = tok.decode(rows.tokens[r][rows.segment_ids[r] == s])
            i = int(full.split("Name ")[1].split("?")[0])
            assert full == (f"<s><|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nName {i}?<|im_end|>\n"
                            f"<|im_start|>assistant\nLear {i}.<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n"
                            f"<|im_start|>assistant\nFool {i}.<|im_end|>\n")
            w = batch["weights"][r, at]
            trained = tok.decode(batch["targets"][r, at][w > 0])
            assert trained == f"Lear {i}.<|im_end|>\nFool {i}.<|im_end|>\n"
            # the prompt side, the assistant headers included, is never a target
            untrained = tok.decode(batch["targets"][r, at][w == 0])
            assert "assistant\n" in untrained and "Lear" not in untrained and "Fool" not in untrained
            found += 1
    assert found == 12 - 1  # all train examples (val_fraction 0.1 of 12: the last one)
    # a prompt/response row becomes a user and an assistant message under the chat template
    qa = write_jsonl(tmp_path / "qa.jsonl", ROWS[:10])
    p = PackedPipeline(sft_config(tmp_path, qa, tokenizer="bpe", tokenizer_path=str(folder), sft_template=""),
                       2, 128, 0)
    b = p.objective(p.sources[0].train_windows(np.arange(p.sources[0].n_train)), np.zeros(p.sources[0].n_train))
    assert p.tokenizer.decode(b["targets"][0][b["weights"][0] > 0]).startswith(f"{ROWS[0]['response']}<|im_end|>\n")


def test_bad_input_is_a_user_error_naming_the_key(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:5] + [{"prompt": "no answer"}] + ROWS[5:10])
    with pytest.raises(UserError, match=r"^data.response_field: example 5 of .* has no field 'response'"):
        PackedPipeline(sft_config(tmp_path, bad), 2, SEQ, 0)
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:10])
    with pytest.raises(UserError, match=r"^data.response_field: .* has no field 'answer'"):
        PackedPipeline(sft_config(tmp_path, good, response_field="answer"), 2, SEQ, 0)
    with pytest.raises(UserError, match=r"^data.sft_template: the tokenizer has no chat template"):
        PackedPipeline(sft_config(tmp_path, good, sft_template=""), 2, SEQ, 0)
    with pytest.raises(UserError, match=r"^data.sft_template: a tokenizer fitted to the data has no chat template"):
        PackedPipeline(sft_config(tmp_path, good, tokenizer="char", sft_template=""), 2, SEQ, 0)
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl",
                           [{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}] * 4)
    with pytest.raises(UserError, match=r"^data.messages_field: example 0 .* no assistant message \(roles: gpt, human"):
        PackedPipeline(sft_config(tmp_path, sharegpt), 2, SEQ, 0)
    with pytest.raises(ValueError, match="data.sft_template must be a format string whose only field is"):
        dataclasses.replace(sft_config(tmp_path, good), sft_template="Q: {question}\nA: ")

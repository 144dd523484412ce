"""HuggingFace tokenizer folders as data.tokenizer_path: eos/pad aliases, the chat template, the to_json round trip."""
import json

import numpy as np
import pytest

from data.cache import get_tokenizer
from data.chat import render
from data.config import DataConfig
from data.tokenize import BPETokenizer, fingerprint, load_tokenizer, save_tokenizer, tokenizer_from_json
from hf_tokenizer_helpers import CHATML, tiny_bpe, write_hf_folder
from parallel.errors import UserError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A player."}, {"role": "user", "content": "Why?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "model")


@pytest.mark.parametrize("which", ["folder", "tokenizer.json"])
def test_folder_specials_and_template(folder, which):
    path = folder if which == "folder" else folder / "tokenizer.json"
    tok, _ = get_tokenizer(DataConfig(mode="packed", tokenizer_path=str(path)))
    eos_id = tok.tok.token_to_id("<|im_end|>")
    assert tok.special_id("<eos>") == eos_id
    assert tok.special_id("<pad>") == eos_id  # no pad_token: padding is the eos token
    assert tok.special_id("<bos>") == tok.tok.token_to_id("<s>")
    assert tok.chat_template == CHATML and tok.special_tokens["bos_token"] == "<s>"
    assert eos_id not in tok.regular_ids() and len(tok.regular_ids()) == tok.vocab_size - 2
    with pytest.raises(UserError, match="<mask>"):
        tok.special_id("<mask>")


def test_round_trip_through_to_json_keeps_aliases_and_template(folder, tmp_path):
    tok = load_tokenizer(folder)
    again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())))
    for name in ("<eos>", "<pad>", "<bos>"):
        assert again.special_id(name) == tok.special_id(name)
    assert again.chat_template == tok.chat_template and fingerprint(again) == fingerprint(tok)
    # a run's workdir: tokenizer.json (ours) next to the run's own config.json
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    save_tokenizer(tok, run / "tokenizer.json")
    saved = load_tokenizer(run / "tokenizer.json")
    assert saved.special_id("<eos>") == tok.special_id("<eos>") and fingerprint(saved) == fingerprint(tok)
    text = "<|im_start|>user\nWherefore?<|im_end|>"
    assert list(saved.encode(text)) == list(tok.encode(text)) and saved.decode(tok.encode(text)) == text


def test_plain_bpe_json_is_unchanged():
    """A tokenizer without folder metadata writes the same JSON as before (its data caches keep their names)."""
    tok = BPETokenizer(tiny_bpe())
    assert set(tok.to_json()) == {"kind", "tokenizer"}
    with pytest.raises(UserError, match="<eos>"):
        tok.special_id("<eos>")


def test_eos_from_config_json_pad_token_and_jinja_file(tmp_path):
    folder = write_hf_folder(tmp_path / "m", tok_config={"pad_token": {"content": "<|endoftext|>", "special": True}},
                             model_config={"eos_token_id": [2, 0], "bos_token_id": None}, jinja="{{ messages }}")
    tok = load_tokenizer(folder)
    assert tok.special_id("<eos>") == 2 == tok.tok.token_to_id("<|im_end|>")  # the first of config.json's ids
    assert tok.special_id("<pad>") == tok.tok.token_to_id("<|endoftext|>")  # an AddedToken dict
    assert tok.chat_template == "{{ messages }}"  # chat_template.jinja, as transformers prefers


def test_bad_folders_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data.tokenizer_path: .* has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    folder = write_hf_folder(tmp_path / "m", tok_config={"eos_token": "</nope>"})
    with pytest.raises(UserError, match="data.tokenizer_path: .*eos_token '</nope>' is not in its vocabulary"):
        load_tokenizer(folder)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_rendering_matches_transformers(folder, generation_prompt):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok = load_tokenizer(folder)
    ours = render(tok.chat_template, CHAT, generation_prompt, tok.special_tokens)
    assert ours == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n")
    assert ref.eos_token_id == tok.special_id("<eos>")
    np.testing.assert_array_equal(tok.encode_batch([ours], add_special_tokens=False)[0],
                                  ref(ours, add_special_tokens=False)["input_ids"])

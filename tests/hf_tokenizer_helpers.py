"""A tiny HuggingFace tokenizer folder (byte-level BPE, ChatML-like chat template) built offline for the tests."""
from __future__ import annotations

import json
from pathlib import Path

from data_helpers import paragraphs

CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]


def tiny_bpe(vocab_size: int = 400):
    """A `tokenizers` byte-level BPE with ChatML specials (what a HF folder's tokenizer.json holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=HF_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([paragraphs(200)], trainer=trainer)
    return tok


def write_hf_folder(folder: Path, *, tok_config: dict | None = None, model_config: dict | None = None,
                    jinja: str | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json (eos <|im_end|>, the ChatML template) [+ config.json, .jinja]."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_bpe().save(str(folder / "tokenizer.json"))
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": "<s>",
            "pad_token": None, "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(base if tok_config is None else tok_config))
    if model_config is not None:
        (folder / "config.json").write_text(json.dumps(model_config))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder

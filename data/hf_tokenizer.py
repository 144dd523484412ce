"""A HuggingFace tokenizer folder (tokenizer.json + tokenizer_config.json, maybe config.json) as a BPETokenizer.

The folder's end-of-sequence token stands in for meshforge's `<eos>`, its pad token (else eos) for `<pad>`, and
its Jinja chat template (tokenizer_config.json `chat_template`, or a chat_template.jinja file, which
transformers prefers) rides along. All of it is kept in meshforge's own tokenizer JSON, so a run's saved
tokenizer.json (and the data cache's fingerprint) carries the same specials and template.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.tokenize import BPETokenizer
from parallel.errors import UserError

TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")


def is_hf_folder(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"data.tokenizer_path: {path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str:
    """tokenizer_config.json writes a token as its text or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _chat_template(folder: Path, config: dict) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # several named templates: transformers uses "default"
        named = {t.get("name"): t.get("template", "") for t in template if isinstance(t, dict)}
        template = named.get("default", "")
    return template if isinstance(template, str) else ""


def special_tokens(tok, tok_config: dict, model_config: dict) -> dict[str, str]:
    """{bos_token, eos_token, pad_token: text} from tokenizer_config.json, else config.json's *_token_id."""
    out = {}
    for key in TOKEN_KEYS:
        text = _token_text(tok_config.get(key))
        if not text:
            token_id = model_config.get(f"{key}_id")
            if isinstance(token_id, list):  # e.g. Llama 3 instruct: several stop ids, the first is the turn's end
                token_id = token_id[0] if token_id else None
            if isinstance(token_id, int) and not isinstance(token_id, bool):
                text = tok.id_to_token(token_id) or ""
        if text:
            out[key] = text
    return out


def load_hf_folder(folder: Path, tokenizer_file: Path | None = None) -> BPETokenizer:
    """The tokenizer of a HuggingFace folder (or of `tokenizer_file` inside it)."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer_file = tokenizer_file or folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"data.tokenizer_path: {folder} has no tokenizer.json; give a HuggingFace folder with a "
                        "fast tokenizer (tokenizer.json) or a tokenizer JSON file")
    try:
        tok = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type for a damaged file
        raise UserError(f"data.tokenizer_path: {tokenizer_file} is not a tokenizers JSON file "
                        f"({type(e).__name__}: {e})") from None
    tok_config = _read_json(folder / "tokenizer_config.json")
    model_config = _read_json(folder / "config.json")
    return BPETokenizer(tok, special_tokens(tok, tok_config, model_config), _chat_template(folder, tok_config))

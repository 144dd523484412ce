"""Tokenizers: byte-level (no training), character-level, and byte-level BPE trained with the `tokenizers` library.

All three map text to int32 ids and back exactly, save as one JSON file (next to the data cache and into the run's
workdir), and may carry special tokens (padding, end of document, mask, span sentinels) that the packed pipeline
and its objectives use. A tokenizer's `fingerprint` (a hash of its JSON) keys the data cache, so a changed
tokenizer is never silently paired with rows tokenized by another one. A HuggingFace tokenizer folder loads as a
BPETokenizer whose <eos>/<pad> are the folder's own tokens and which carries its chat template
(data/hf_tokenizer.py); both survive the round trip through `to_json`.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from data.hashing import digest
from parallel.errors import UserError

N_SENTINELS = 32  # span corruption: at most this many corrupted spans per row
SPECIALS = ("<pad>", "<eos>", "<mask>") + tuple(f"<extra_id_{i}>" for i in range(N_SENTINELS))


class Tokenizer(Protocol):
    kind: str
    vocab_size: int  # every id the tokenizer can produce, special tokens included

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]: ...
    def decode(self, ids) -> str: ...
    def special_id(self, name: str) -> int: ...
    def regular_ids(self) -> np.ndarray: ...
    def to_json(self) -> dict: ...


class _SpecialIds:
    """`special_id` over the tokenizer's {name: id} map; `_no_special` says how to get one that has the token."""

    kind: str
    _special_index: dict[str, int]
    _no_special = ""  # format string with {kind} and {name}

    def special_id(self, name: str) -> int:
        if name not in self._special_index:
            raise UserError(self._no_special.format(kind=self.kind, name=name))
        return self._special_index[name]


class _Specials(_SpecialIds):
    """Special tokens appended after a tokenizer's own ids (byte and char tokenizers)."""

    _no_special = ("the {kind} tokenizer has no special token {name}; the packed pipeline (data.mode packed) "
                   "builds tokenizers with them")

    def _init_specials(self, base: int, specials: tuple[str, ...]):
        self.base_size, self.specials = base, tuple(specials)
        self.vocab_size = base + len(self.specials)
        self._special_index = {name: base + i for i, name in enumerate(self.specials)}

    def _specials_json(self) -> dict:
        return {"specials": list(self.specials)} if self.specials else {}

    def regular_ids(self) -> np.ndarray:
        return np.arange(self.base_size, dtype=np.int32)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]  # these tokenizers never add specials of their own

    def _decode_with(self, ids, decode_regular) -> str:
        out, run = [], []
        for i in map(int, ids):
            if 0 <= i < self.base_size:
                run.append(i)
            elif self.base_size <= i < self.vocab_size:
                out.append(decode_regular(run))
                out.append(self.specials[i - self.base_size])
                run = []
        out.append(decode_regular(run))
        return "".join(out)


class ByteTokenizer(_Specials):
    kind = "byte"

    def __init__(self, specials: tuple[str, ...] = ()):
        self._init_specials(256, specials)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return self._decode_with(ids, lambda run: bytes(run).decode("utf-8", errors="replace"))

    def to_json(self) -> dict:
        return {"kind": self.kind, **self._specials_json()}


class CharTokenizer(_Specials):
    """One id per distinct character of the corpus, in sorted order (as nanoGPT's char model), then specials."""

    kind = "char"

    def __init__(self, chars: str, specials: tuple[str, ...] = ()):
        self.chars = chars
        self._init_specials(len(chars), specials)
        self._table = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int32)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def fit(cls, text: str, specials: tuple[str, ...] = ()) -> "CharTokenizer":
        return cls("".join(sorted(set(text))), specials)

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        if (ids < 0).any():
            bad = sorted({chr(c) for c in codes[ids < 0]})
            raise UserError(f"text has characters outside the tokenizer's vocabulary: {''.join(bad)!r}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        return self._decode_with(ids, lambda run: "".join(self.chars[i] for i in run))

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars, **self._specials_json()}


class BPETokenizer(_SpecialIds):
    """A byte-level BPE (the `tokenizers` library): any text round-trips exactly; specials are whole tokens."""

    kind = "bpe"
    _no_special = ("this BPE tokenizer has no special token {name}; train it with meshforge's specials "
                   "(meshforge tokenizer train), or give data.tokenizer_path a HuggingFace folder whose "
                   "tokenizer_config.json names eos_token")

    def __init__(self, tok, special_tokens: dict[str, str] | None = None, chat_template: str = ""):
        """special_tokens: a HuggingFace folder's {bos_token, eos_token, pad_token: token text}; they stand in
        for meshforge's <eos> / <pad> (pad falls back to eos). chat_template: the folder's Jinja chat template."""
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v}
        self.chat_template = chat_template or ""
        specials = [t for t in SPECIALS if tok.token_to_id(t) is not None]
        self._special_index = {t: tok.token_to_id(t) for t in specials}
        for name, token in self.special_tokens.items():
            if tok.token_to_id(token) is None:
                raise UserError(f"data.tokenizer_path: the tokenizer's {name} {token!r} is not in its vocabulary")
        aliases = {"<bos>": "bos_token", "<eos>": "eos_token", "<pad>": "pad_token"}
        if "pad_token" not in self.special_tokens:  # HF causal LMs rarely name one; padding is never trained
            aliases["<pad>"] = "eos_token"
        for name, key in aliases.items():
            if key in self.special_tokens:  # the folder's own choice wins over a token that happens to be named so
                self._special_index[name] = tok.token_to_id(self.special_tokens[key])

    @classmethod
    def train(cls, texts: Iterable[list[str]], vocab_size: int, specials: tuple[str, ...] = SPECIALS,
              length: int | None = None) -> "BPETokenizer":
        """Train on batches of texts. Deterministic: the same texts give the same merges."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @classmethod
    def from_str(cls, spec: str, special_tokens: dict[str, str] | None = None,
                 chat_template: str = "") -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(spec), special_tokens, chat_template)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        """add_special_tokens False: no BOS/EOS from the tokenizer's post-processor (text a template rendered)."""
        return [np.asarray(e.ids, dtype=np.int32)
                for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def regular_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.vocab_size, dtype=np.int32),
                            np.fromiter(self._special_index.values(), np.int32, len(self._special_index)))

    def to_json(self) -> dict:
        out = {"kind": self.kind, "tokenizer": self.tok.to_str()}
        if self.special_tokens:  # only when set: a plain BPE keeps its fingerprint (and its data caches)
            out["special_tokens"] = dict(sorted(self.special_tokens.items()))
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out


def eos_id(tok: Tokenizer) -> int | None:
    """The end-of-sequence id, or None for a char/byte tokenizer of the windows pipeline (which has none:
    generation then runs its whole budget)."""
    try:
        return tok.special_id("<eos>")
    except UserError:
        return None


def fingerprint(tok: Tokenizer) -> str:
    return digest(tok.to_json())


def build_tokenizer(kind: str, text: str, *, vocab_size: int = 2048) -> Tokenizer:
    """A tokenizer fitted to one text (the windows pipeline); the packed pipeline fits over documents instead."""
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train([[text]], vocab_size)
    raise UserError(f"data.tokenizer: unknown tokenizer {kind!r}; use 'char', 'byte' or 'bpe'")


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write atomically: several processes of one run may save the same tokenizer at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.write_text(json.dumps(tok.to_json(), ensure_ascii=False))
    tmp.replace(path)


def tokenizer_from_json(spec: dict, where: str = "tokenizer") -> Tokenizer:
    if not isinstance(spec, dict):
        raise UserError(f"{where}: not a tokenizer JSON object")
    kind = spec.get("kind")
    try:
        specials = tuple(spec.get("specials", ()))
        if kind == "char":
            return CharTokenizer(spec["chars"], specials)
        if kind == "byte":
            return ByteTokenizer(specials)
        if kind == "bpe":
            return BPETokenizer.from_str(spec["tokenizer"], spec.get("special_tokens"), spec.get("chat_template", ""))
        if "model" in spec and "pre_tokenizer" in spec:  # a HuggingFace tokenizers JSON file
            return BPETokenizer.from_str(json.dumps(spec))
    except Exception as e:  # noqa: BLE001 - a broken file surfaces as KeyError, TypeError or tokenizers' own type
        if isinstance(e, UserError):
            raise
        raise UserError(f"{where}: a damaged {kind} tokenizer ({type(e).__name__}: {e})") from None
    raise UserError(f"{where}: unknown tokenizer kind {kind!r}")


def load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer JSON (ours, or a HF tokenizers file), or a HuggingFace folder (see data/hf_tokenizer.py)."""
    from data.hf_tokenizer import is_hf_folder, load_hf_folder

    path = Path(path).expanduser()
    if path.is_dir():
        return load_hf_folder(path)
    if not path.is_file():
        raise UserError(f"data.tokenizer_path: no such file: {path}; give a tokenizer JSON "
                        "(e.g. a run's tokenizer.json), a HuggingFace tokenizer folder, or leave it empty to "
                        "build one")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a tokenizer JSON file ({e})") from None
    if isinstance(spec, dict) and "kind" not in spec and is_hf_folder(path.parent):
        return load_hf_folder(path.parent, path)  # a folder's tokenizer.json: its config names eos and template
    return tokenizer_from_json(spec, str(path))

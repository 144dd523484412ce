"""Character- and byte-level tokenizers: no training, exact round trips, saved as JSON next to a run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from parallel.errors import UserError


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids) -> str: ...
    def to_json(self) -> dict: ...


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


class CharTokenizer:
    """One id per distinct character of the training corpus, in sorted order (as nanoGPT's char model)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        self._table = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int32)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        if (ids < 0).any():
            bad = sorted({chr(c) for c in codes[ids < 0]})
            raise UserError(f"text has characters outside the tokenizer's vocabulary: {''.join(bad)!r}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def build_tokenizer(kind: str, text: str) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "byte":
        return ByteTokenizer()
    raise UserError(f"data.tokenizer: unknown tokenizer {kind!r}; use 'char' or 'byte'")


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    path.write_text(json.dumps(tok.to_json(), ensure_ascii=False))


def load_tokenizer(path: Path) -> Tokenizer:
    spec = json.loads(Path(path).read_text())
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    if spec["kind"] == "byte":
        return ByteTokenizer()
    raise UserError(f"{path}: unknown tokenizer kind {spec['kind']!r}")

"""Where text comes from: local files, and the corpora shipped inside this package (`builtin:NAME`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from parallel.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "corpora"


def resolve_path(path: str) -> Path:
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        p = BUILTIN_DIR / name
        if not p.is_file():
            shipped = sorted(f.name for f in BUILTIN_DIR.glob("*.txt"))
            raise UserError(f"data.path: no built-in corpus {name!r}; shipped: {', '.join(shipped)}")
        return p
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.path: file not found: {path} (give an existing text file, or builtin:tinyshakespeare.txt)")
    return p


def read_text(path: str) -> str:
    p = resolve_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data.path: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise UserError(f"data.path: {path} is empty; give a file with text in it")
    return text


def text_splits(path: str, val_fraction: float, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the text, split into (train, validation): the validation split is the tail of the file."""
    ids = tokenizer.encode(read_text(path))
    n_val = int(len(ids) * val_fraction)
    if n_val < 2 or len(ids) - n_val < 2:
        raise UserError(f"data.path: {path} has only {len(ids)} tokens, too few to split into train and validation")
    return ids[:-n_val], ids[-n_val:]

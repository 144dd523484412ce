"""Decontamination: drop every training document that shares a word n-gram (13 by default) with an evaluation set.

datatrove's own n-gram decontamination reads its evaluation sets through lighteval, which meshforge does not
depend on; this is the same rule as a small filter over a local evaluation set. Words are those of text.words
(lowercase, punctuation turned into spaces). The evaluation set's n-grams are held as 64-bit hashes of the joined
words (Python's string hash: collisions between a few million n-grams are vanishingly rare), loaded once per
worker process.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from data.curate.text import words
from parallel.errors import UserError

EVAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".txt", ".text")
_LOADED: dict[tuple, frozenset[int]] = {}  # per process: the n-grams of each evaluation set


def eval_files(path: str) -> list[Path]:
    """The evaluation files a file, folder or glob names, sorted."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(EVAL_SUFFIXES))
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"decontaminate.eval_path: not found: {path}; give an evaluation file, folder or glob")
    bad = [f for f in files if not f.name.endswith(EVAL_SUFFIXES)]
    if bad:
        raise UserError(f"decontaminate.eval_path: {bad[0]} is neither JSONL nor text; use {', '.join(EVAL_SUFFIXES)}")
    if not files:
        raise UserError(f"decontaminate.eval_path: {path} holds no {', '.join(EVAL_SUFFIXES)} files")
    return files


def eval_texts(files: list[str], text_field: str):
    for name in files:
        if name.endswith((".txt", ".text")):
            yield Path(name).read_text(encoding="utf-8", errors="replace")
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if isinstance(text, str):
                        yield text


def ngram_hashes(ws: list[str], n: int):
    for i in range(len(ws) - n + 1):
        yield hash(" ".join(ws[i:i + n]))


def check_eval_set(files: list[Path], text_field: str) -> None:
    """Refuse an evaluation JSONL file whose first record lacks the text field (before any stage runs)."""
    for f in files:
        if f.name.endswith((".jsonl", ".json")):
            with f.open(encoding="utf-8") as fh:
                line = next((ln for ln in fh if ln.strip()), "")
            try:
                record = json.loads(line) if line else {}
            except json.JSONDecodeError:
                raise UserError(f"decontaminate.eval_path: {f} is not JSONL (its first line is not JSON)") from None
            if line and (not isinstance(record, dict) or text_field not in record):
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"decontaminate.text_field: {text_field!r} is not in the first record of {f} "
                                f"(it has {keys}); set --decontaminate.text_field")


class Decontaminate(BaseFilter):
    """Removes documents with an n-gram of the evaluation set; reason `eval_<n>gram`."""

    name = "🧪 meshforge decontaminate"

    def __init__(self, files: list[str], text_field: str = "text", n: int = 13, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.files = files
        self.text_field = text_field
        self.n = n
        self.reason = f"eval_{n}gram"

    def grams(self) -> frozenset[int]:
        key = (tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files), self.text_field, self.n)
        if key not in _LOADED:
            _LOADED[key] = frozenset(h for t in eval_texts(self.files, self.text_field)
                                     for h in ngram_hashes(words(t), self.n))
        return _LOADED[key]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        grams = self.grams()
        if any(h in grams for h in ngram_hashes(words(doc.text), self.n)):
            return False, self.reason
        return True

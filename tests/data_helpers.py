"""Small corpora and configs for the data-pipeline tests: made in a temp folder from the shipped corpus."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data.config import DataConfig, SourceConfig
from data.sources import read_text

SHAKESPEARE = read_text("builtin:tinyshakespeare.txt")


def paragraphs(n: int, start: int = 0) -> list[str]:
    return [p for p in SHAKESPEARE.split("\n\n") if p.strip()][start:start + n]


def write_corpus(folder: Path, n_docs: int = 300) -> dict[str, Path]:
    """The same documents as a .txt (blank-line paragraphs), a .jsonl, a .parquet, and a folder of .txt files."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    docs = paragraphs(n_docs)
    (folder / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(folder / "corpus.parquet"))
    (folder / "files").mkdir(exist_ok=True)
    for i in range(3):
        (folder / "files" / f"part{i}.txt").write_text("\n\n".join(docs[i::3]))
    return {"txt": folder / "corpus.txt", "jsonl": folder / "corpus.jsonl", "parquet": folder / "corpus.parquet",
            "folder": folder / "files"}


def packed(cache: Path, **kw) -> DataConfig:
    base = dict(mode="packed", tokenizer="char", cache_dir=str(cache), prefetch=0)
    return DataConfig(**{**base, **kw})


def mixture(cache: Path, corpus: Path, **kw) -> DataConfig:
    return packed(cache, sources=(SourceConfig(str(corpus), 2.0, "paragraph"),
                                  SourceConfig("synthetic:addition?digits=2", 1.0)), **kw)


def replace(cfg: DataConfig, **kw) -> DataConfig:
    return dataclasses.replace(cfg, **kw)


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def docs_generator():
    """A generator source for the tests (generator:data_helpers:docs_generator, with tests/ on sys.path)."""
    for i, p in enumerate(paragraphs(120)):
        yield p if i % 2 else {"text": p}

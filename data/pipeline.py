"""A data pipeline is what the training loop sees of data: a tokenizer, train batches by step, eval batches.

Every batch is a dict of host numpy arrays with the rows this process holds: `inputs`, `targets`, `weights`
(B, T), optionally `segment_ids` and `positions` for packed documents. Train batches are a pure function of
(seed, step), so the pipeline's checkpointed state is just the step.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from data.config import DataConfig
from data.loader import Batch, WindowLoader, eval_batches
from data.sources import read_text, text_splits
from data.tokenize import Tokenizer, build_tokenizer, load_tokenizer


class Pipeline(Protocol):
    tokenizer: Tokenizer

    def train_batch(self, step: int, rows: np.ndarray) -> Batch: ...

    def eval_batches(self, batch_size: int, rows: np.ndarray, max_batches: int = 0) -> Iterator[Batch]: ...

    def state(self, step: int) -> dict: ...


class TextPipeline:
    """One local text file, character- or byte-level, random windows for training, the file's tail for eval."""

    def __init__(self, cfg: DataConfig, batch_size: int, seq_len: int, seed: int, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or build_tokenizer(cfg.tokenizer, read_text(cfg.path))
        self.train_ids, self.val_ids = text_splits(cfg.path, cfg.val_fraction, self.tokenizer)
        self.seq_len = seq_len
        self.loader = WindowLoader(self.train_ids, batch_size, seq_len, seed)

    def train_batch(self, step: int, rows: np.ndarray) -> Batch:
        return self.loader.host_batch(step, rows)

    def eval_batches(self, batch_size: int, rows: np.ndarray, max_batches: int = 0) -> Iterator[Batch]:
        return eval_batches(self.val_ids, batch_size, self.seq_len, rows, max_batches)

    def state(self, step: int) -> dict:
        return {"step": step}


def build_pipeline(cfg: DataConfig, *, batch_size: int, seq_len: int, seed: int,
                   workdir: Path | None = None) -> Pipeline:
    """The pipeline for a data section; a run's saved tokenizer (workdir/tokenizer.json) wins over a new one."""
    saved = workdir / "tokenizer.json" if workdir else None
    tokenizer = load_tokenizer(saved) if saved is not None and saved.exists() else None
    return TextPipeline(cfg, batch_size, seq_len, seed, tokenizer)

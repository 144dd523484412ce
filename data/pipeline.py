"""A data pipeline is what the training loop sees of data: a tokenizer, train batches by step, eval batches.

Every batch is a dict of host numpy arrays with the rows this process holds: `inputs`, `targets`, `weights`
(B, T), optionally `segment_ids` and `positions` for packed documents. Train batches are a pure function of
the loader's position, which `state(step)` reports for the checkpoint and `restore(state)` takes back.
`tasks` are the synthetic tasks in the data, whose exact-match accuracy the loop measures from model samples.
`val_names` names the validation sources; with more than one, eval batches also carry `source` (B,) int32, each
row's index into it, and the loop logs val_loss_<name> per source (data/validation.py plans the windows).

Two implementations: `TextPipeline` (data.mode windows: random windows of one text file) and
`data.packed.PackedPipeline` (data.mode packed: datasets-backed sources, packing, objectives, mixtures, and
supervised fine-tuning examples, data/sft.py). `data.tokenizer_path` may name a HuggingFace tokenizer folder.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from data.config import DataConfig, SourceConfig
from data.build_once import process_count
from data.loader import Batch, WindowLoader, eval_batches
from data.sources import read_text, text_splits
from data.tokenize import Tokenizer, build_tokenizer, load_tokenizer
from data.validation import max_windows


class Pipeline(Protocol):
    tokenizer: Tokenizer
    tasks: list  # data.synthetic.Task objects the loop evaluates by exact match (empty for plain corpora)
    val_names: list[str]  # the validation sources' names (eval batches' `source` indexes it when there are several)

    def host_batch(self, step: int, rows: np.ndarray) -> Batch: ...  # built now, without prefetch

    def train_batch(self, step: int, rows: np.ndarray) -> Batch: ...

    def eval_batches(self, batch_size: int, rows: np.ndarray, max_batches: int = 0) -> Iterator[Batch]: ...

    def state(self, step: int) -> dict: ...

    def restore(self, state: dict) -> None: ...

    def close(self) -> None: ...  # stop background work; idempotent


class TextPipeline:
    """One local text file, character- or byte-level, random windows for training, the file's tail for eval."""

    tasks: list = []

    def __init__(self, cfg: DataConfig, batch_size: int, seq_len: int, seed: int, tokenizer: Tokenizer | None = None):
        if tokenizer is None and cfg.tokenizer_path:
            tokenizer = load_tokenizer(Path(cfg.tokenizer_path))
        self.tokenizer = tokenizer or build_tokenizer(cfg.tokenizer, read_text(cfg.path),
                                                      vocab_size=cfg.bpe_vocab_size)
        self.train_ids, self.val_ids = text_splits(cfg.path, cfg.val_fraction, self.tokenizer)
        self.seq_len, self.max_windows = seq_len, max_windows(cfg.val_max_tokens, seq_len)
        self.val_names = [SourceConfig(cfg.path).resolved_name()]
        self.loader = WindowLoader(self.train_ids, batch_size, seq_len, seed)

    def host_batch(self, step: int, rows: np.ndarray) -> Batch:
        return self.loader.host_batch(step, rows)

    def train_batch(self, step: int, rows: np.ndarray) -> Batch:
        return self.host_batch(step, rows)  # windows are cheap: no prefetch

    def eval_batches(self, batch_size: int, rows: np.ndarray, max_batches: int = 0) -> Iterator[Batch]:
        return eval_batches(self.val_ids, batch_size, self.seq_len, rows, max_batches, self.max_windows)

    def state(self, step: int) -> dict:
        return self.loader.state(step)

    def restore(self, state: dict) -> None:
        self.loader.restore(state)  # windows are a function of (seed, sample position)

    def close(self) -> None:
        pass  # nothing runs in the background


def build_pipeline(cfg: DataConfig, *, batch_size: int, seq_len: int, seed: int,
                   workdir: Path | None = None) -> Pipeline:
    """The pipeline for a data section; a run's saved tokenizer (workdir/tokenizer.json) wins over a new one."""
    saved = workdir / "tokenizer.json" if workdir else None
    have_saved = saved is not None and saved.exists()
    if saved is not None and process_count() > 1:
        # every process must take the same path: fitting the tokenizer is a collective (data/build_once.py), so a
        # process that cannot see the saved file (a workdir per host, a stale NFS listing) fits it with the others
        from parallel.hosts import any_process

        have_saved = not any_process(not have_saved)
    tokenizer = load_tokenizer(saved) if have_saved else None
    if cfg.mode == "packed":
        from data import hub
        from data.packed import PackedPipeline  # imports HF datasets, which the windows mode never needs

        hub.set_offline(cfg.hf_offline)  # before any hf: source is resolved (a saved tokenizer skips get_tokenizer)
        return PackedPipeline(cfg, batch_size, seq_len, seed, tokenizer)
    return TextPipeline(cfg, batch_size, seq_len, seed, tokenizer)

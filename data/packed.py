"""The packed pipeline: sources -> cached packed rows (or generated task rows, or packed sft examples) -> mixture
order -> objective.

Sample position p of the run (step * batch_size + row, counted from the last restore) decides everything: which
source (MixtureSchedule), which row of it (a per-epoch permutation), and the objective's random choices. A host
builds only the positions of its own rows, a background thread builds the next few steps ahead, and the state
saved with a checkpoint is the position reached, so a resumed run (even with another batch size) continues the
same sample stream without replaying it.

Validation reads each source's held-out tail, or with `data.val_sources` whole sources of their own (WholeSource),
in the order data/validation.py plans (with the data.val_max_tokens cap); with several validation sources each
eval batch carries its rows' source index (`source`), so one pass gives the loss of every source.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from data import hub
from data.cache import cache_root, check_seq_len, get_tokenizer, log, packed_rows
from data.config import DataConfig, SourceConfig
from data.hashing import digest
from data.loader import Batch, MixtureSchedule, Prefetcher, eval_plan, permute
from data.objectives import SPLIT_IDS, Objective, Windows
from data.sft import SFTSource
from data.sources import source_kind
from data.stream import StreamSource, samples_before
from data.synthetic import HELD_OUT_SEED, Task, make_task, task_salt
from data.tokenize import Tokenizer, fingerprint
from data.validation import ValPlan, max_windows
from parallel.errors import UserError

VAL_POSITION_BASE = 1 << 40  # validation windows key their random choices apart from training positions


class CorpusSource:
    """A file or generator source: cached rows of pack_len + 1 tokens, each cut into pack_len // seq_len windows."""

    def __init__(self, key: str, src: SourceConfig, index: int, cfg: DataConfig, tokenizer: Tokenizer,
                 seq_len: int, seed: int):
        pack_len = cfg.pack_len or seq_len
        self.train, self.val, self.meta = packed_rows(key, src, tokenizer, pack_len, cfg.val_fraction,
                                                      cache_root(cfg), num_proc=cfg.num_proc)
        self.key, self.path, self.weight, self.seq_len = key, src.path, src.weight, seq_len
        self.per_row = pack_len // seq_len
        self.n_train = self.train.n_rows * self.per_row
        self.n_val = self.val.n_rows * self.per_row
        self.shuffle, self.seed, self.index = cfg.shuffle, seed, index

    def _windows(self, store, q: np.ndarray) -> Windows:
        tokens, segments = store.gather(q // self.per_row, (q % self.per_row) * self.seq_len, self.seq_len + 1)
        return Windows(tokens, segments, np.ones(tokens.shape, bool))

    def train_windows(self, index: np.ndarray) -> Windows:
        """The index-th window of this source's endless stream: epoch index // n, a fresh permutation per epoch."""
        epoch, q = np.divmod(index, self.n_train)
        if self.shuffle:
            for e in np.unique(epoch):
                at = epoch == e
                q[at] = permute(q[at], self.n_train, self.seed, self.index, int(e))
        return self._windows(self.train, q)

    def val_windows(self, index: np.ndarray) -> Windows:
        return self._windows(self.val, index)

    def train_window_at(self, q: np.ndarray) -> Windows:
        """Training windows by their id 0..n_train-1, unshuffled (federated clients keep their own order)."""
        return self._windows(self.train, np.asarray(q, np.int64))


def check_task_fits(key: str, task: Task, seq_len: int) -> None:
    longest = task.max_chars + 1  # ASCII: never more tokens than characters, plus <eos>
    if longest > seq_len:  # (seq_len, not + 1: a sampled answer must stay inside the model's positions)
        raise UserError(f"train.seq_len: {seq_len} is shorter than the longest {task.name} problem "
                        f"({longest} tokens) of {key}.path; raise train.seq_len")


class TaskSource:
    """A synthetic task: row i packs `per_row` problems drawn from a generator seeded by (seed, task, split, i)."""

    def __init__(self, key: str, src: SourceConfig, task: Task, cfg: DataConfig, tokenizer: Tokenizer, seq_len: int,
                 seed: int):
        self.task = task  # made and checked against seq_len by the pipeline
        self.key, self.path, self.weight, self.seq_len = key, src.path, src.weight, seq_len
        self.per_row = (seq_len + 1) // (self.task.max_chars + 1)
        self.tokenizer, self.seed, self.salt = tokenizer, seed, task_salt(self.task)
        self.loss_on_prompt = cfg.loss_on_prompt
        self.pad, self.eos = tokenizer.special_id("<pad>"), tokenizer.special_id("<eos>")
        self.n_train, self.n_val = None, cfg.synthetic_val_rows

    def _windows(self, index: np.ndarray, split: str) -> Windows:
        prompts, answers = [], []
        for i in index:
            seed = self.seed if split == "train" else HELD_OUT_SEED  # one validation set for every train.seed
            rng = np.random.default_rng([seed, self.salt, SPLIT_IDS[split], int(i)])
            for _ in range(self.per_row):
                p, a = self.task.sample(rng, split)
                prompts.append(p)
                answers.append(a)
        p_ids, a_ids = self.tokenizer.encode_batch(prompts), self.tokenizer.encode_batch(answers)
        shape = (len(index), self.seq_len + 1)
        tokens, segments, loss = np.full(shape, self.pad, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool)
        filled = np.zeros(len(index), np.int64)
        for e, (p, a) in enumerate(zip(p_ids, a_ids)):
            r, j = divmod(e, self.per_row)
            at = filled[r]
            filled[r] = end = at + len(p) + len(a) + 1
            tokens[r, at:end] = np.concatenate([p, a, [self.eos]])
            segments[r, at:end] = j + 1
            loss[r, at if self.loss_on_prompt else at + len(p):end] = True
        return Windows(tokens, segments, loss)

    def train_windows(self, index: np.ndarray) -> Windows:
        return self._windows(index, "train")

    def val_windows(self, index: np.ndarray) -> Windows:
        return self._windows(index, "val")


class WholeSource:
    """A validation-only source (data.val_sources): every document, its cached train rows then its val rows.

    Built as a training source of its own (unshuffled, so window i is the i-th in the cache): packed_rows keeps
    its usual split, and both halves serve as validation windows."""

    def __init__(self, base: CorpusSource | SFTSource):
        self.base, self.n_first = base, base.n_train
        self.n_val = base.n_train + base.n_val

    def val_windows(self, index: np.ndarray) -> Windows:
        index = np.asarray(index, np.int64)
        first = index < self.n_first
        parts = [(at, read(index[at] - offset)) for at, read, offset in
                 ((first, self.base.train_windows, 0), (~first, self.base.val_windows, self.n_first)) if at.any()]
        return concat_windows(parts, len(index), self.base.seq_len + 1)


def concat_windows(parts: list[tuple[np.ndarray, Windows]], n: int, length: int) -> Windows:
    out = Windows(np.zeros((n, length), np.int32), np.zeros((n, length), np.int32), np.zeros((n, length), bool))
    for at, w in parts:
        out.tokens[at], out.segment_ids[at], out.loss_mask[at] = w.tokens, w.segment_ids, w.loss_mask
    return out


class PackedPipeline:
    def __init__(self, cfg: DataConfig, batch_size: int, seq_len: int, seed: int, tokenizer: Tokenizer | None = None):
        if cfg.objective == "span" and seq_len < 8:
            raise UserError(f"train.seq_len: span corruption needs at least 8 tokens per row, got {seq_len}")
        self.cfg, self.batch_size, self.seq_len, self.seed = cfg, batch_size, seq_len, seed
        tasks: dict[str, Task] = {}
        val_tasks: dict[str, Task] = {}
        # cheap checks first: nothing is fitted or cached for a bad config
        for key, src in cfg.source_list() + cfg.val_source_list():
            if source_kind(src.path) == "synthetic":
                task = (val_tasks if key.startswith("data.val_sources") else tasks)[key] = make_task(key, src.path)
                check_task_fits(key, task, seq_len)
            elif cfg.objective != "sft":  # sft packs whole examples into rows of seq_len + 1 itself
                check_seq_len(seq_len, cfg.pack_len or seq_len)
        if tokenizer is None:
            tokenizer, _ = get_tokenizer(cfg)
        self.tokenizer = tokenizer
        self.sources = [self._source(key, src, i, tasks.get(key), cfg) for i, (key, src) in
                        enumerate(cfg.source_list())]
        self.tasks: list[Task] = [s.task for s in self.sources if isinstance(s, TaskSource)]
        self.val_sources, self.val_names = self.sources, [s.resolved_name() for _, s in cfg.source_list()]
        if cfg.val_sources:
            whole = dataclasses.replace(cfg, shuffle=False)  # a WholeSource reads its train rows in cache order
            self.val_sources = [self._source(key, src, -1, val_tasks.get(key), whole) for key, src in
                                cfg.val_source_list()]
            # (tasks and streamed sources are endless: their validation rows as they are)
            self.val_sources = [s if s.n_train is None else WholeSource(s) for s in self.val_sources]
            self.val_names = [s.resolved_name() for s in cfg.val_sources]
        self.val_plan = ValPlan([s.n_val for s in self.val_sources], max_windows(cfg.val_max_tokens, seq_len))
        self.schedule = MixtureSchedule([s.weight for s in self.sources], seed)
        self.objective = Objective(cfg.objective, tokenizer, seq_len, seed, cfg.mask_rate, cfg.span_mean)
        self.fingerprint = digest(
            [[s.path for s in self.sources], [getattr(s, "meta", {}).get("settings") for s in self.sources],
             [s.weight for s in self.sources], fingerprint(tokenizer), cfg.objective, seq_len, seed])
        self.base_step, self.base_position = 0, 0
        self._prefetchers: dict[bytes, Prefetcher] = {}

    def _source(self, key: str, src: SourceConfig, index: int, task: Task | None, cfg: DataConfig
                ) -> CorpusSource | TaskSource | SFTSource | StreamSource:
        if task is not None:  # a task's prompts carry no loss already, so tasks mix with sft sources as they are
            return TaskSource(key, src, task, cfg, self.tokenizer, self.seq_len, self.seed)
        if hub.is_streamed(src.path, key):  # hf:...?streaming=1: tokenized in order as training reads it
            return StreamSource(key, src, cfg, self.tokenizer, self.seq_len)
        if cfg.objective == "sft":
            return SFTSource(key, src, index, cfg, self.tokenizer, self.seq_len, self.seed)
        return CorpusSource(key, src, index, cfg, self.tokenizer, self.seq_len, self.seed)

    # --- training batches ---

    def position(self, step: int) -> int:
        """Samples drawn before this step (the loader's place in its endless stream)."""
        return self.base_position + (step - self.base_step) * self.batch_size

    def batch_at(self, positions: np.ndarray) -> Batch:
        """The training batch of these sample positions (a pure function of the positions)."""
        positions = np.asarray(positions, np.int64)
        source, index = self.schedule.locate(positions)
        parts = [(at, self.sources[k].train_windows(index[at]))
                 for k in np.unique(source) for at in [np.flatnonzero(source == k)]]
        windows = parts[0][1] if len(parts) == 1 else concat_windows(parts, len(positions), self.seq_len + 1)
        return self.objective(windows, positions, "train")

    def host_batch(self, step: int, rows: np.ndarray) -> Batch:
        return self.batch_at(self.position(step) + np.asarray(rows, np.int64))

    def train_batch(self, step: int, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, np.int64)
        key = rows.tobytes()
        if key not in self._prefetchers:
            self._prefetchers[key] = Prefetcher(lambda s, rows=rows: self.host_batch(s, rows), self.cfg.prefetch)
        return self._prefetchers[key].get(step)

    # --- evaluation ---

    def eval_batches(self, batch_size: int, rows: np.ndarray, max_batches: int = 0) -> Iterator[Batch]:
        """Every planned validation window of every validation source once, in order (all of them unless
        data.val_max_tokens caps them); the last batch's missing rows weigh 0. With several validation sources
        a batch also holds each row's source index, `source` (B,) int32, in the order of `val_names`."""
        plan = self.val_plan
        for g, live in eval_plan(plan.total, batch_size, rows, max_batches):
            source, index, position = plan.locate(g)
            parts = [(at, self.val_sources[k].val_windows(index[at]))
                     for k in np.unique(source) for at in [np.flatnonzero(source == k)]]
            windows = concat_windows(parts, len(g), self.seq_len + 1)
            batch = self.objective(windows, VAL_POSITION_BASE + position, "val")
            batch["weights"] = batch["weights"] * live[:, None]
            if len(self.val_sources) > 1:
                batch["source"] = source.astype(np.int32)
            yield batch

    # --- checkpointed state ---

    def state(self, step: int) -> dict:
        position = self.position(step)
        finite = [s for s in self.sources if s.n_train]
        state = {"step": step, "position": position, "batch_size": self.batch_size, "seed": self.seed,
                 "fingerprint": self.fingerprint}
        if len(self.sources) == 1 and finite:
            state["epoch"] = position // finite[0].n_train
        streams = {s.key: s.cursor_at(samples_before(self.schedule, position, k))
                   for k, s in enumerate(self.sources) if isinstance(s, StreamSource)}
        if streams:  # where each streamed source's next training window starts in its stream
            state["streams"] = streams
        return state

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state: the next step reads from the position it reached."""
        if not state or "position" not in state:
            return
        for p in self._prefetchers.values():
            p.close()
        self._prefetchers.clear()
        self.base_step, self.base_position = int(state["step"]), int(state["position"])
        if state.get("fingerprint") != self.fingerprint:
            log("the data (sources, tokenizer, objective, seq_len or seed) changed since this checkpoint; "
                f"continuing at sample {self.base_position} of the new data")
        saved = state.get("streams", {}) if state.get("fingerprint") == self.fingerprint else {}
        for k, s in enumerate(self.sources):
            if isinstance(s, StreamSource):
                s.seek(saved.get(s.key), samples_before(self.schedule, self.base_position, k))

    def close(self) -> None:
        """Stop the prefetch threads (idempotent)."""
        for p in self._prefetchers.values():
            p.close()
        self._prefetchers.clear()

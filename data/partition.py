"""Clients for federated rounds: the training windows of a packed pipeline split among N clients, K of them a round.

Partitions (outer.partition), over the training windows of every file or generator source of the mixture:
- `iid`: all windows shuffled and dealt evenly;
- `dirichlet`: for each source, client shares q ~ Dirichlet(alpha, ..., alpha) (Hsu et al. 2019); source k's
  windows, shuffled, are cut in those proportions. Small alpha gives each client nearly one source. Drawn again
  (a new seed) until every client holds at least one batch of windows;
- `source`: the natural partition, one client per source.

Round k trains the clients `rounds(k)`: K of N drawn without replacement by a generator seeded with (seed, k),
replica r serving the r-th. A client continues its own endless stream (its windows in a fresh order each of its
epochs) from where its last round left it, so a client's data is never replayed early and resuming needs no
state beyond the step. Everything is a pure function of (seed, step).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from data.loader import Batch, Prefetcher, permute
from parallel.errors import UserError

CLIENT_SALT = 0xC11E
PARTITION, ROUND = 1, 2  # a trailing tag, so that no partition draw shares a seed with a round's draw


class Clients:
    """Which windows each client holds and which clients train in each round."""

    def __init__(self, sizes: list[int], n_clients: int, per_round: int, partition: str, alpha: float, seed: int,
                 min_windows: int, labels: np.ndarray | None = None):
        """sizes: training windows per source; labels: a label id per window (all sources, in order) for a
        Dirichlet partition over a label instead of the source."""
        self.n, self.k, self.seed = n_clients, per_round, seed
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.members = self._partition(sizes, partition, alpha, min_windows, labels)
        self.examples = np.array([len(m) for m in self.members], np.int64)
        self._rounds: list[np.ndarray] = []
        self._before: list[np.ndarray] = [np.zeros(n_clients, np.int64)]  # rounds each client trained before k
        self._lock = threading.Lock()  # the prefetch thread and the loop both extend the rounds

    def _partition(self, sizes: list[int], partition: str, alpha: float, min_windows: int,
                   labels: np.ndarray | None) -> list[np.ndarray]:
        ids = [self.offsets[s] + np.arange(n) for s, n in enumerate(sizes)]
        if partition == "source":
            if self.n != len(sizes):
                raise UserError(f"outer.clients: the source partition makes one client per source; set "
                                f"outer.clients {len(sizes)} (the mixture has {len(sizes)} sources)")
            return self._enough(ids, min_windows, "outer.clients")
        if partition == "iid":
            rng = np.random.default_rng([self.seed, CLIENT_SALT, 0, PARTITION])
            return self._enough(list(np.array_split(rng.permutation(np.concatenate(ids)), self.n)), min_windows,
                                "outer.clients")
        if labels is not None:  # Dirichlet shares per label value instead of per source
            ids = [np.flatnonzero(labels == v) for v in np.unique(labels)]
        for attempt in range(100):
            rng = np.random.default_rng([self.seed, CLIENT_SALT, attempt, PARTITION])
            parts: list[list[np.ndarray]] = [[] for _ in range(self.n)]
            for source_ids in ids:
                q = rng.dirichlet(np.full(self.n, alpha))
                cuts = np.round(np.cumsum(q)[:-1] * len(source_ids)).astype(np.int64)
                for c, chunk in enumerate(np.split(rng.permutation(source_ids), cuts)):
                    parts[c].append(chunk)
            members = [np.sort(np.concatenate(p)) for p in parts]
            if min(len(m) for m in members) >= min_windows:
                return members
        raise UserError(f"outer.alpha: {alpha} leaves some of {self.n} clients with fewer than {min_windows} "
                        f"training windows in 100 draws; raise outer.alpha, lower outer.clients, or add data")

    @staticmethod
    def _enough(members: list[np.ndarray], min_windows: int, setting: str) -> list[np.ndarray]:
        smallest = min(len(m) for m in members)
        if smallest < min_windows:
            raise UserError(f"{setting}: a client holds only {smallest} training windows, fewer than one batch "
                            f"({min_windows}); use fewer clients or more data")
        return members

    def rounds(self, k: int) -> np.ndarray:
        """The K clients of round k (replica r serves the r-th)."""
        with self._lock:
            while len(self._rounds) <= k:
                r = len(self._rounds)
                rng = np.random.default_rng([self.seed, CLIENT_SALT, r, ROUND])
                chosen = rng.choice(self.n, self.k, replace=False).astype(np.int64)
                before = self._before[-1].copy()
                before[chosen] += 1
                self._before.append(before)
                self._rounds.append(chosen)
            return self._rounds[k]

    def rounds_before(self, k: int, client: np.ndarray) -> np.ndarray:
        self.rounds(k)
        return self._before[k][client]

    def weights(self, rounds: int, by_examples: bool) -> np.ndarray:
        """(rounds, K): each replica's share of the mean, by its client's windows or uniform."""
        out = np.empty((rounds, self.k), np.float64)
        for k in range(rounds):
            e = self.examples[self.rounds(k)].astype(np.float64) if by_examples else np.ones(self.k)
            out[k] = e / e.sum()
        return out

    def window_ids(self, client: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Global window ids of each client's position-th sample: its windows in a fresh order per epoch."""
        out = np.empty(len(client), np.int64)
        for c in np.unique(client):
            at = client == c
            n = len(self.members[c])
            epoch, j = np.divmod(position[at], n)
            for e in np.unique(epoch):
                sel = epoch == e
                j[sel] = permute(j[sel], n, self.seed, CLIENT_SALT, int(c), int(e))
            out[at] = self.members[c][j]
        return out


class ClientPipeline:
    """A packed pipeline whose train rows come from the clients of the current round (eval is unchanged)."""

    def __init__(self, base, clients: Clients, inner_steps: int, batch_size: int, replicas: int):
        from data.packed import concat_windows  # (data.packed imports datasets: only federated runs need it)

        self._concat = concat_windows
        self.base, self.clients, self.h = base, clients, inner_steps
        self.per_replica = batch_size // replicas
        self.tokenizer, self.tasks, self.val_names = base.tokenizer, base.tasks, base.val_names
        self._prefetchers: dict[bytes, Prefetcher] = {}

    def host_batch(self, step: int, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, np.int64)
        replica, i = np.divmod(rows, self.per_replica)
        k = step // self.h
        client = self.clients.rounds(k)[replica]
        position = ((self.clients.rounds_before(k, client) * self.h + step % self.h) * self.per_replica + i)
        ids = self.clients.window_ids(client, position)
        source = np.searchsorted(self.clients.offsets, ids, side="right") - 1
        parts = [(at, self.base.sources[s].train_window_at(ids[at] - self.clients.offsets[s]))
                 for s in np.unique(source) for at in [np.flatnonzero(source == s)]]
        windows = parts[0][1] if len(parts) == 1 else self._concat(parts, len(rows), self.base.seq_len + 1)
        return self.base.objective(windows, step * (1 << 20) + rows, "train")

    def train_batch(self, step: int, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, np.int64)
        key = rows.tobytes()
        if key not in self._prefetchers:
            self._prefetchers[key] = Prefetcher(lambda s, rows=rows: self.host_batch(s, rows), self.base.cfg.prefetch)
        return self._prefetchers[key].get(step)

    def eval_batches(self, batch_size: int, rows: np.ndarray, max_batches: int = 0) -> Iterator[Batch]:
        return self.base.eval_batches(batch_size, rows, max_batches)

    def state(self, step: int) -> dict:
        return {"step": step, "clients": self.clients.n, "per_round": self.clients.k}  # all else follows the step

    def restore(self, state: dict) -> None:
        for p in self._prefetchers.values():
            p.close()
        self._prefetchers.clear()

    def close(self) -> None:
        self.restore({})
        self.base.close()


def window_labels(base, field: str) -> np.ndarray:
    """A label id per training window of every source (in order): the `field` of the JSONL/Parquet record whose
    document holds the window's first token."""
    from data.cache import cache_root
    from data.sources import load_documents, split_documents

    values = []
    for source, (key, src) in zip(base.sources, base.cfg.source_list()):
        try:
            docs = load_documents(key, src, cache_root(base.cfg) / "hf", keep=(field,))
        except UserError as e:
            raise UserError(f"outer.partition_key: {field!r} is not a field of every source ({e}); use 'source' or "
                            "a field all records have") from None
        train_docs, _ = split_documents(docs, base.cfg.val_fraction, key)
        per_doc = np.array([str(v) for v in train_docs[field]])
        q = np.arange(source.n_train)
        doc = source.train.documents_at(q // source.per_row, (q % source.per_row) * source.seq_len)
        values.append(per_doc[doc])
    return np.unique(np.concatenate(values), return_inverse=True)[1]


def federate(base, *, clients: int, per_round: int, partition: str, alpha: float, key: str, seed: int,
             inner_steps: int, batch_size: int):
    """`base` (a packed pipeline; train/setup.py checked the mode) with its training rows served by clients.
    key: what the Dirichlet partition splits, "source" or a field of the records."""
    sizes = [s.n_train for s in base.sources]  # (train/setup.py refused synthetic tasks and sft sources)
    labels = window_labels(base, key) if partition == "dirichlet" and key != "source" else None
    plan = Clients(sizes, clients, per_round, partition, alpha, seed, min_windows=batch_size // per_round,
                   labels=labels)
    return ClientPipeline(base, plan, inner_steps, batch_size, per_round)

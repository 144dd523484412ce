"""Self-supervised objectives: packed windows in, (inputs, targets, weights) batches out for the one train step.

A window is `seq_len + 1` tokens of a packed row with its segment ids (0 = padding) and a loss mask (1 where a
token may be a training target; synthetic prompts are 0). Every objective returns int32 `inputs`, `targets`,
`segment_ids`, `positions` and float32 `weights`, all (N, seq_len). Random choices are keyed by
(seed, split, sample position), so a batch is the same on any host and after any restart.

- causal: next-token prediction inside each document.
- sft: causal over packed fine-tuning examples; the loss mask (response tokens, data/sft.py) picks the targets.
- masked: BERT-style; 15% of the tokens are targets, of which 80% become <mask>, 10% a random token, 10% stay.
  Needs a bidirectional model (model.causal false).
- span: T5-style span corruption, for a decoder-only model. Random spans (15% of the tokens, mean length 3)
  are replaced by sentinels, and the model then writes each sentinel followed by the tokens it hid:
  `a b <x0> e <x1> h <eos>`-style prefix, then `<x0> c d <x1> f g <eos>`; only the second part is trained.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data.hashing import uniform
from data.packing import positions_from_segments
from data.tokenize import N_SENTINELS, Tokenizer

SPLIT_IDS = {"train": 0, "val": 1}


@dataclasses.dataclass
class Windows:
    tokens: np.ndarray  # (N, seq_len + 1) int32
    segment_ids: np.ndarray  # (N, seq_len + 1) int32, 0 = padding
    loss_mask: np.ndarray  # (N, seq_len + 1) bool


class Objective:
    def __init__(self, kind: str, tokenizer: Tokenizer, seq_len: int, seed: int, rate: float = 0.15,
                 span_mean: float = 3.0):
        self.kind, self.seq_len, self.seed, self.rate, self.span_mean = kind, seq_len, seed, rate, span_mean
        self.pad = tokenizer.special_id("<pad>")
        self.eos = tokenizer.special_id("<eos>")
        if kind == "masked":
            self.mask = tokenizer.special_id("<mask>")
            self.regular = tokenizer.regular_ids()
            self.is_regular = np.zeros(tokenizer.vocab_size, bool)
            self.is_regular[self.regular] = True
        if kind == "span":
            self.sentinels = np.array([tokenizer.special_id(f"<extra_id_{i}>") for i in range(N_SENTINELS)])
            self.n_raw = max(n for n in range(2, seq_len + 1) if n + 2 * self._n_spans(n) <= seq_len)

    def __call__(self, win: Windows, positions: np.ndarray, split: str = "train") -> dict[str, np.ndarray]:
        """positions: the global sample position of each window (keys its random choices)."""
        if self.kind in ("causal", "sft"):
            return self.causal(win)
        if self.kind == "masked":
            return self.masked(win, positions, split)
        return self.span(win, positions, split)

    def causal(self, win: Windows) -> dict[str, np.ndarray]:
        T = self.seq_len
        seg = win.segment_ids
        weights = (seg[:, 1:] == seg[:, :T]) & (seg[:, :T] > 0) & win.loss_mask[:, 1:]
        return {"inputs": win.tokens[:, :T], "targets": win.tokens[:, 1:], "weights": weights.astype(np.float32),
                "segment_ids": seg[:, :T], "positions": positions_from_segments(seg)[:, :T]}

    def masked(self, win: Windows, positions: np.ndarray, split: str) -> dict[str, np.ndarray]:
        T = self.seq_len
        tokens, seg = win.tokens[:, :T], win.segment_ids[:, :T]
        keys = (self.seed, SPLIT_IDS[split], positions[:, None].astype(np.int64), np.arange(T)[None])
        candidates = (seg > 0) & self.is_regular[tokens] & win.loss_mask[:, :T]
        chosen = candidates & (uniform(*keys, 0) < self.rate)
        action = uniform(*keys, 1)  # < 0.8: <mask>; < 0.9: a random token; else unchanged
        random_ids = self.regular[(uniform(*keys, 2) * len(self.regular)).astype(np.int64)]
        inputs = np.where(chosen & (action < 0.8), self.mask, np.where(chosen & (action < 0.9), random_ids, tokens))
        return {"inputs": inputs.astype(np.int32), "targets": tokens, "weights": chosen.astype(np.float32),
                "segment_ids": seg, "positions": positions_from_segments(seg)}

    def _n_spans(self, n_tokens: int) -> int:
        noise = min(max(round(n_tokens * self.rate), 1), max(n_tokens - 1, 1))
        return int(min(N_SENTINELS, max(1, round(noise / self.span_mean)), noise, max(n_tokens - noise, 1)))

    def span(self, win: Windows, positions: np.ndarray, split: str) -> dict[str, np.ndarray]:
        T, N = self.seq_len, len(win.tokens)
        out = {"inputs": np.full((N, T), self.pad, np.int32), "targets": np.full((N, T), self.pad, np.int32),
               "weights": np.zeros((N, T), np.float32), "segment_ids": np.zeros((N, T), np.int32),
               "positions": np.zeros((N, T), np.int32)}
        for r in range(N):
            raw = win.tokens[r, : self.n_raw][win.segment_ids[r, : self.n_raw] > 0]
            if len(raw) < 2:
                continue
            rng = np.random.default_rng([self.seed, SPLIT_IDS[split], int(positions[r])])
            prefix, answer = corrupt_spans(raw, self.rate, self._n_spans(len(raw)), self.sentinels, rng)
            seq = np.concatenate([prefix, answer, [self.eos]])
            n = len(seq) - 1
            out["inputs"][r, :n], out["targets"][r, :n] = seq[:-1], seq[1:]
            out["weights"][r, len(prefix) - 1:n] = 1.0  # from predicting the first sentinel of the answer
            out["segment_ids"][r, :n] = 1
            out["positions"][r, :n] = np.arange(n)
        return out


def _random_lengths(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive lengths summing to `total`, uniformly among such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def corrupt_spans(tokens: np.ndarray, rate: float, n_spans: int, sentinels: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted tokens, answer): T5's alternating kept / noise spans, starting with a kept one."""
    n = len(tokens)
    n_noise = min(max(round(n * rate), n_spans), n - n_spans)
    noise = _random_lengths(n_noise, n_spans, rng)
    keep = _random_lengths(n - n_noise, n_spans, rng)
    prefix, answer, at = [], [], 0
    for i in range(n_spans):
        prefix.append(tokens[at: at + keep[i]])
        at += keep[i]
        prefix.append(sentinels[i: i + 1])
        answer.append(sentinels[i: i + 1])
        answer.append(tokens[at: at + noise[i]])
        at += noise[i]
    return np.concatenate(prefix).astype(np.int32), np.concatenate(answer).astype(np.int32)


def uncorrupt_spans(prefix: np.ndarray, answer: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """The original tokens back from a corrupted prefix and its answer (the checker of corrupt_spans)."""
    is_sent = np.isin(answer, sentinels)
    spans = np.split(answer, np.flatnonzero(is_sent))[1:]
    filled = {int(s[0]): s[1:] for s in spans}
    return np.concatenate([filled[int(t)] if t in filled else [t] for t in prefix]).astype(np.int32)

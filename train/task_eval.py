"""Exact-match accuracy on synthetic tasks, from the model's own samples.

For each task in the data, a fixed set of held-out prompts (never in the training stream) is decoded greedily
in one batch, each completion is cut at the end-of-document token and judged by the task's exact checker.
Decoding runs as one jitted loop over a fixed window (left-aligned prompts; causal masking hides the unwritten
tail), like train/sample.py, with the batch sharded as in training so it works on any mesh and across hosts.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data.loader import process_rows
from data.synthetic import eval_problems
from parallel.hosts import gather
from parallel.mesh import padded_rows
from train.setup import Setup


def make_greedy_decode(mdef, vocab_limit: int, new_tokens: int, param_shardings, batch_sharding: NamedSharding):
    """jit: (params, buf_BW, lengths_B) -> buf_BW with `new_tokens` greedy tokens written after each prompt."""
    lengths_sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0]))

    def decode(params, buf_BW, lengths_B):
        B = buf_BW.shape[0]

        def write_next(_, carry):
            buf_BW, lengths_B = carry
            logits_BWV = mdef.apply(params, buf_BW)
            last_BV = jnp.take_along_axis(logits_BWV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
            last_BV = jnp.where(jnp.arange(last_BV.shape[-1]) < vocab_limit, last_BV, -jnp.inf)
            next_B = jnp.argmax(last_BV, axis=-1).astype(buf_BW.dtype)
            return buf_BW.at[jnp.arange(B), lengths_B].set(next_B), lengths_B + 1

        return jax.lax.fori_loop(0, new_tokens, write_next, (buf_BW, lengths_B))[0]

    return jax.jit(decode, in_shardings=(param_shardings, batch_sharding, lengths_sharding),
                   out_shardings=batch_sharding), lengths_sharding


def task_evaluator(setup: Setup) -> "TaskEvaluator | None":
    """The evaluator for the run's synthetic tasks; None when there is nothing to score (no tasks, a
    bidirectional model that cannot generate, or data.eval_problems 0)."""
    if setup.data.tasks and setup.cfg.model.causal and setup.cfg.data.eval_problems:
        return TaskEvaluator(setup)
    return None


class _Job(NamedTuple):
    task: Any
    problems: list[tuple[str, str]]
    lengths: np.ndarray  # prompt length of each row (host copy, to cut the completions)
    decode: Any  # the jitted greedy decoder
    buf: jax.Array  # prompts, left-aligned and padded, as a global batch (built once: they never change)
    lengths_g: jax.Array


class TaskEvaluator:
    """Call with the params: {'exact_match': mean over tasks, 'exact_match_<task>' when there are several}."""

    def __init__(self, setup: Setup):
        data, tok = setup.data, setup.data.tokenizer
        self.tasks, self.tokenizer = list(data.tasks), tok
        self.eos = tok.special_id("<eos>")
        n = setup.cfg.data.eval_problems
        self.jobs = []
        for task in self.tasks:
            problems = eval_problems(task, n)
            prompts = tok.encode_batch([p for p, _ in problems])
            new_tokens = max(len(a) for a in tok.encode_batch([a for _, a in problems])) + 1  # + <eos>
            width = max(len(p) for p in prompts) + new_tokens
            rows = padded_rows(setup.mesh, len(problems))  # extra rows repeat problem 0
            buf = np.full((rows, width), tok.special_id("<pad>"), np.int32)
            lengths = np.empty(rows, np.int32)
            for i in range(rows):
                p = prompts[i if i < len(prompts) else 0]
                buf[i, : len(p)], lengths[i] = p, len(p)
            decode, lengths_sharding = make_greedy_decode(setup.mdef, tok.vocab_size, new_tokens,
                                                          setup.shardings["params"], setup.batch_sharding)
            mine = process_rows(setup.batch_sharding, rows)
            buf_g = jax.make_array_from_process_local_data(setup.batch_sharding, buf[mine], buf.shape)
            len_g = jax.make_array_from_process_local_data(lengths_sharding, lengths[mine], lengths.shape)
            self.jobs.append(_Job(task, problems, lengths, decode, buf_g, len_g))

    def completions(self, params, job: _Job) -> list[str]:
        out = gather(job.decode(params, job.buf, job.lengths_g))
        lengths, texts = job.lengths, []
        for i in range(len(job.problems)):
            new = out[i, lengths[i]:]
            stop = np.flatnonzero(new == self.eos)
            texts.append(self.tokenizer.decode(new[: stop[0]] if len(stop) else new))
        return texts

    def __call__(self, params) -> dict[str, float]:
        scores = {}
        for i, job in enumerate(self.jobs):
            task, problems = job.task, job.problems
            texts = self.completions(params, job)
            name = task.name if task.name not in scores else f"{task.name}_{i}"
            scores[name] = float(np.mean([task.check(p, c) for (p, _), c in zip(problems, texts)]))
        out = {"exact_match": float(np.mean(list(scores.values())))}
        if len(scores) > 1:
            out.update({f"exact_match_{name}": v for name, v in scores.items()})
        return out

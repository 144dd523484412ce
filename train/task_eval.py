"""Exact-match accuracy on synthetic tasks, from the model's own samples.

For each task in the data, a fixed set of held-out prompts (never in the training stream) is decoded greedily
in one batch by the KV-cache generator (train/generate.py, the one `meshforge sample` uses), each completion is
cut at the end-of-document token and judged by the task's exact checker. The batch is sharded as in training, so
it works on any mesh and across hosts.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from data.synthetic import eval_problems
from train.generate import Generator
from train.setup import Setup


def task_evaluator(setup: Setup) -> "TaskEvaluator | None":
    """The evaluator for the run's synthetic tasks; None when there is nothing to score (no tasks, a
    bidirectional model that cannot generate, or data.eval_problems 0)."""
    if setup.data.tasks and setup.cfg.model.causal and setup.cfg.data.eval_problems:
        return TaskEvaluator(setup)
    return None


class _Job(NamedTuple):
    task: Any
    problems: list[tuple[str, str]]
    prompts: list[np.ndarray]
    new_tokens: int  # the longest answer and its <eos>


class TaskEvaluator:
    """Call with the params: {'exact_match': mean over tasks, 'exact_match_<task>' when there are several}."""

    def __init__(self, setup: Setup):
        data, tok = setup.data, setup.data.tokenizer
        self.tasks, self.tokenizer = list(data.tasks), tok
        self.eos = tok.special_id("<eos>")
        self.generator = Generator(setup.mdef, setup.mesh, setup.shardings["params"], vocab_limit=tok.vocab_size,
                                   eos_id=self.eos)
        n = setup.cfg.data.eval_problems
        self.jobs = []
        for task in self.tasks:
            problems = eval_problems(task, n)
            prompts = tok.encode_batch([p for p, _ in problems])
            new_tokens = max(len(a) for a in tok.encode_batch([a for _, a in problems])) + 1  # + <eos>
            self.jobs.append(_Job(task, problems, prompts, new_tokens))

    def completions(self, params, job: _Job) -> list[str]:
        outs = self.generator.generate(params, job.prompts, job.new_tokens)
        return [self.tokenizer.decode(out[:-1] if len(out) and out[-1] == self.eos else out) for out in outs]

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

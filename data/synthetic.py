"""Generated tasks with exact checkers: seeded, unbounded, and with held-out problems the model never trains on.

A task turns a random generator into one (prompt, answer) pair of short ASCII strings and can check a model's
completion of a prompt exactly. Sources name them as `synthetic:NAME?key=value&...`, e.g.
`synthetic:addition?digits=3`. Held-out problems are fixed by a hash of the problem's canonical form (`a+b` and
`b+a` are one problem, a sort task is its multiset of letters), so the training stream provably never contains an
evaluation problem nor a trivial rewrite of one; the held-out set depends on the task alone, never on the seed.

Registered: addition / arithmetic (multi-digit +, -, *), sort, reverse, copy, brackets (close a balanced-bracket
prefix), markov (a random sparse Markov chain whose entropy rate, hence the loss floor, is known exactly).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import string
import urllib.parse
from typing import Callable

import numpy as np

from parallel.errors import UserError

HELD_OUT_PERCENT = 10  # of the problem space, by hash


def held_out(*key) -> bool:
    """Whether a problem (identified by its defining values) belongs to the held-out evaluation set."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


MAX_DRAWS = 10_000  # held_out() keeps ~10% of problems: 10,000 misses in a row means a tiny problem space


class Task:
    name: str = ""
    alphabet: str = ""  # every character a prompt or answer can contain
    max_chars: int = 0  # longest prompt + answer
    loss_floor: float | None = None  # expected loss per trained token of a perfect model, when known

    def draw(self, rng: np.random.Generator) -> tuple[tuple, str, str]:
        """(problem key, prompt, answer) for one random problem."""
        raise NotImplementedError

    def canonical(self, key: tuple) -> tuple:
        """One representative of the problems a model would solve by knowing this one (the problem itself unless a
        task says otherwise): the held-out split is decided on it, so such problems fall on the same side."""
        return key

    def is_held_out(self, key: tuple) -> bool:
        return held_out(self.name, *self.canonical(key))

    def sample(self, rng: np.random.Generator, split: str = "train") -> tuple[str, str]:
        """One (prompt, answer) from the training problems, or from the held-out ones (split 'val')."""
        want = split != "train"
        for _ in range(MAX_DRAWS):
            key, prompt, answer = self.draw(rng)
            if self.hold_out is False or self.is_held_out(key) == want:
                return prompt, answer
        raise UserError(f"data: task {getattr(self, 'spec', self.name)!r} has too few distinct problems to hold "
                        f"some out for evaluation (none of {MAX_DRAWS} draws was a {split} problem); "
                        "make the task larger (more digits, symbols or length)")

    hold_out = True  # False for tasks whose problems are not worth holding out (the Markov language)

    def check(self, prompt: str, completion: str) -> bool:
        return completion == self.answer(prompt)

    def answer(self, prompt: str) -> str:
        raise NotImplementedError


class Arithmetic(Task):
    """`a OP b=` -> the exact result, operands with exactly `digits` digits; `reverse` writes it backwards."""

    OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}

    def __init__(self, digits: int = 3, op: str = "add", reverse: bool = False):
        if op not in self.OPS:
            raise UserError(f"synthetic arithmetic: op must be one of {', '.join(self.OPS)}, got {op!r}")
        if not 1 <= digits <= 9:
            raise UserError(f"synthetic arithmetic: digits must be in 1..9, got {digits}")
        self.digits, self.op, self.reverse = digits, op, reverse
        self.symbol, self.fn = self.OPS[op]
        self.name = f"arithmetic_{op}{digits}"
        self.alphabet = string.digits + self.symbol + "=-"
        self.lo, self.hi = (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits
        extremes = [self.fn(a, b) for a in (self.lo, self.hi - 1) for b in (self.lo, self.hi - 1)]
        self.max_chars = 2 * digits + 2 + max(len(str(r)) for r in extremes)

    def draw(self, rng):
        a, b = (int(x) for x in rng.integers(self.lo, self.hi, size=2))
        prompt = f"{a}{self.symbol}{b}="
        return (a, b), prompt, self.answer(prompt)

    def canonical(self, key: tuple) -> tuple:
        # + and * commute: a model that trained on b+a has seen a+b's answer. a-b and b-a differ.
        return tuple(sorted(key)) if self.op in ("add", "mul") else key

    def answer(self, prompt: str) -> str:
        a, b = prompt[:-1].split(self.symbol, 1)
        result = str(self.fn(int(a), int(b)))
        return result[::-1] if self.reverse else result


class Sequence(Task):
    """`sort:dcab=` -> `abcd`, and likewise `reverse` and `copy`, over `symbols` letters."""

    def __init__(self, kind: str, min_len: int = 1, max_len: int = 8, symbols: int = 10):
        if not 1 <= min_len <= max_len:
            raise UserError(f"synthetic {kind}: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if not 2 <= symbols <= 26:
            raise UserError(f"synthetic {kind}: symbols must be in 2..26, got {symbols}")
        self.kind, self.min_len, self.max_len = kind, min_len, max_len
        self.letters = string.ascii_lowercase[:symbols]
        self.name = kind
        self.alphabet = "".join(sorted(set(self.letters + kind + ":=")))
        self.max_chars = len(kind) + 2 + 2 * max_len

    def draw(self, rng):
        n = int(rng.integers(self.min_len, self.max_len + 1))
        seq = "".join(self.letters[i] for i in rng.integers(0, len(self.letters), size=n))
        prompt = f"{self.kind}:{seq}="
        return (seq,), prompt, self.answer(prompt)

    def canonical(self, key: tuple) -> tuple:
        (seq,) = key
        if self.kind == "sort":  # every order of the same letters has one answer: the multiset is the problem
            return ("".join(sorted(seq)),)
        if self.kind == "reverse":  # reverse:abc=cba holds the whole of reverse:cba=abc
            return (min(seq, seq[::-1]),)
        return key

    def answer(self, prompt: str) -> str:
        seq = prompt[len(self.kind) + 1:-1]
        return {"sort": "".join(sorted(seq)), "reverse": seq[::-1], "copy": seq}[self.kind]


class Brackets(Task):
    """`close:([{(=` -> `)}])`: the shortest completion that balances a bracket prefix (checked by a parser)."""

    PAIRS = {"(": ")", "[": "]", "{": "}"}

    def __init__(self, max_len: int = 12, kinds: int = 3):
        if not 2 <= max_len <= 64:
            raise UserError(f"synthetic brackets: max_len must be in 2..64, got {max_len}")
        self.max_len = max_len
        self.opens = "([{"[:max(1, min(kinds, 3))]
        self.name = "brackets"
        self.alphabet = "".join(sorted(set("close:=" + self.opens + "".join(self.PAIRS[o] for o in self.opens))))
        self.max_chars = 7 + 2 * (max_len + 1)

    def draw(self, rng):
        n = int(rng.integers(1, self.max_len + 1))
        stack: list[str] = []
        out = []
        for _ in range(n):
            if not stack or rng.random() < 0.55:  # open (always, when nothing is open), else close the last
                stack.append(self.opens[int(rng.integers(len(self.opens)))])
                out.append(stack[-1])
            else:
                out.append(self.PAIRS[stack.pop()])
        if not stack:  # a balanced prefix has nothing to close: open one more
            out.append(self.opens[int(rng.integers(len(self.opens)))])
        prefix = "".join(out)
        prompt = f"close:{prefix}="
        # The canonical form is the prefix itself: two prefixes with the same unclosed brackets share an answer,
        # but telling which brackets are unclosed is the task, so grouping them would hold out answers instead.
        return (prefix,), prompt, self.answer(prompt)

    def answer(self, prompt: str) -> str:
        stack = []
        for ch in prompt[6:-1]:
            if ch in self.PAIRS:
                stack.append(ch)
            elif stack and self.PAIRS[stack[-1]] == ch:
                stack.pop()
        return "".join(self.PAIRS[o] for o in reversed(stack))

    def check(self, prompt: str, completion: str) -> bool:
        """Balanced, and minimal: a parser's verdict, not a string comparison."""
        stack = []
        for ch in prompt[6:-1] + completion:
            if ch in self.PAIRS:
                stack.append(ch)
            elif not stack or self.PAIRS[stack.pop()] != ch:
                return False
        return not stack and len(completion) == len(self.answer(prompt))


class Markov(Task):
    """Sequences of `length` letters from a random sparse Markov chain (`branching` successors per state).

    The prompt is the first letter, drawn from the stationary distribution; the answer the rest. A completion
    checks if every transition has non-zero probability. The entropy rate H (nats per letter) is exact, so a
    perfect model's loss per trained token is (length - 1) * H / length (the end-of-document token is certain).
    """

    hold_out = False

    def __init__(self, states: int = 8, branching: int = 3, length: int = 24, chain_seed: int = 0):
        if not 2 <= states <= 26 or not 1 <= branching <= states or length < 2:
            raise UserError("synthetic markov: need 2 <= states <= 26, 1 <= branching <= states, length >= 2")
        rng = np.random.default_rng(chain_seed)
        P = np.zeros((states, states))
        for s in range(states):
            succ = rng.choice(states, size=branching, replace=False)
            P[s, succ] = rng.dirichlet(np.ones(branching))
        vals, vecs = np.linalg.eig(P.T)
        pi = np.abs(np.real(vecs[:, np.argmin(np.abs(vals - 1))]))
        self.P, self.pi = P, pi / pi.sum()
        self.states, self.length = states, length
        self.letters = string.ascii_lowercase[:states]
        logs = np.where(P > 0, np.log(np.where(P > 0, P, 1)), 0.0)
        self.entropy_rate = float(-(self.pi[:, None] * P * logs).sum())
        self.loss_floor = (length - 1) * self.entropy_rate / length
        self.name = "markov"
        self.alphabet = self.letters
        self.max_chars = length
        self._cum = np.cumsum(P, axis=1)

    def draw(self, rng):
        s = int(rng.choice(self.states, p=self.pi))
        seq = [s]
        u = rng.random(self.length - 1)
        for x in u:
            s = min(int(np.searchsorted(self._cum[s], x, side="right")), self.states - 1)
            seq.append(s)
        text = "".join(self.letters[i] for i in seq)
        return (text,), text[0], text[1:]

    def check(self, prompt: str, completion: str) -> bool:
        text = prompt + completion
        if len(text) != self.length or any(c not in self.letters for c in text):
            return False
        idx = [self.letters.index(c) for c in text]
        return all(self.P[a, b] > 0 for a, b in zip(idx, idx[1:]))


REGISTRY: dict[str, Callable[..., Task]] = {
    "addition": lambda digits=3, reverse=False: Arithmetic(digits, "add", reverse),
    "arithmetic": Arithmetic,
    "sort": lambda min_len=1, max_len=8, symbols=10: Sequence("sort", min_len, max_len, symbols),
    "reverse": lambda min_len=1, max_len=8, symbols=10: Sequence("reverse", min_len, max_len, symbols),
    "copy": lambda min_len=1, max_len=8, symbols=10: Sequence("copy", min_len, max_len, symbols),
    "brackets": Brackets,
    "markov": Markov,
}


def _convert(key: str, name: str, raw: str, default):
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError(raw)
        return type(default)(raw)
    except ValueError:
        raise UserError(f"{key}.path: synthetic parameter {name}={raw!r} must be a {type(default).__name__}") from None


def make_task(key: str, path: str) -> Task:
    """`synthetic:NAME?key=value&...` -> a Task; unknown names and parameters are user errors."""
    spec = urllib.parse.urlsplit(path.removeprefix("synthetic:"))
    name = spec.path
    if name not in REGISTRY:
        raise UserError(f"{key}.path: unknown synthetic task {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    factory = REGISTRY[name]
    params = {p.name: p.default for p in inspect.signature(factory).parameters.values()
              if p.default is not inspect.Parameter.empty}
    kwargs = {}
    for k, v in urllib.parse.parse_qsl(spec.query, keep_blank_values=True):
        if k not in params:
            raise UserError(f"{key}.path: synthetic task {name!r} has no parameter {k!r}; it takes "
                            f"{', '.join(params) or 'none'}")
        kwargs[k] = _convert(key, k, v, params[k])
    return _build_task(factory, tuple(kwargs.items()), path)


@functools.lru_cache(maxsize=64)
def _build_task(factory: Callable[..., Task], kwargs: tuple, path: str) -> Task:
    """The task, built and probed once per spec (a pipeline build asks for each of its tasks several times)."""
    task = factory(**dict(kwargs))
    task.spec = path
    probe = np.random.default_rng(0)
    task.sample(probe, "train"), task.sample(probe, "val")  # a task too small to split fails here, not mid-run
    return task


def task_salt(task: Task) -> int:
    """A stable number per task spec: two sources of the same task with other parameters draw other streams."""
    return int.from_bytes(hashlib.blake2b(task.spec.encode(), digest_size=4).digest(), "little")


HELD_OUT_SEED = 0x4E1D  # keys every held-out draw instead of train.seed, so a seed sweep shares one eval set


def eval_problems(task: Task, n: int) -> list[tuple[str, str]]:
    """n held-out (prompt, answer) problems, the same at every evaluation, on every host and for every seed."""
    rng = np.random.default_rng([HELD_OUT_SEED, task_salt(task), 7])
    return [task.sample(rng, "val") for _ in range(n)]

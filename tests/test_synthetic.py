"""Synthetic tasks: exact checkers, held-out problems, the Markov language's entropy, packed task rows, exact match."""
import dataclasses

import numpy as np
import pytest

from data.config import DataConfig
from data.synthetic import REGISTRY, Markov, eval_problems, held_out, make_task
from data.packed import PackedPipeline
from helpers import TINY, mesh_for
from parallel.errors import UserError
from parallel.hosts import StepFlags
from parallel.mesh import batch_sharding
from train.config import Config, TrainConfig
from train.setup import Setup, resolve_model
from train.state import model_def, state_shardings
from train.task_eval import TaskEvaluator

SPECS = ["synthetic:addition", "synthetic:arithmetic?op=sub&digits=2", "synthetic:arithmetic?op=mul&digits=2",
         "synthetic:sort", "synthetic:reverse", "synthetic:copy", "synthetic:brackets", "synthetic:markov"]


def _wrong(answer: str) -> str:
    return answer[:-1] + ("0" if answer[-1] != "0" else "1") if answer[-1].isdigit() else answer + answer[-1]


@pytest.mark.parametrize("spec", SPECS)
def test_checkers_accept_answers_and_reject_wrong_ones(spec):
    task = make_task("data", spec)
    rng = np.random.default_rng(0)
    for _ in range(300):
        prompt, answer = task.sample(rng)
        assert task.check(prompt, answer), (prompt, answer)
        assert not task.check(prompt, answer[:-1]) or task.name == "markov" and not answer[:-1]
        assert set(prompt + answer) <= set(task.alphabet) and len(prompt + answer) <= task.max_chars
    if task.name != "markov":
        assert not task.check(prompt, _wrong(answer))
    assert set(REGISTRY) >= {"addition", "sort", "reverse", "copy", "brackets", "markov"}


def test_arithmetic_and_brackets_are_really_checked():
    add = make_task("data", "synthetic:addition?digits=3")
    assert add.check("123+989=", "1112") and not add.check("123+989=", "1111")
    assert make_task("data", "synthetic:addition?reverse=true").check("123+989=", "2111")
    br = make_task("data", "synthetic:brackets")
    assert br.check("close:([{}=", "])") and not br.check("close:([{}=", ")]") and not br.check("close:(=", "))")


def test_training_never_sees_held_out_problems():
    task = make_task("data", "synthetic:addition?digits=3")
    rng = np.random.default_rng(1)
    train = [task.sample(rng, "train")[0] for _ in range(3000)]
    evals = [p for p, _ in eval_problems(task, 300)]
    key = lambda p: held_out(task.name, *sorted(map(int, p[:-1].split("+"))))  # noqa: E731
    assert not any(map(key, train)) and all(map(key, evals))
    assert not set(train) & set(evals)
    assert evals == [p for p, _ in eval_problems(task, 300)]  # the same problems at every eval


def _canonical(prompt: str) -> tuple:
    """A problem's canonical form, written from the task definitions (not from data/synthetic.py): problems with
    the same form are one problem to a model (a+b and b+a; any order of the letters a sort receives; a sequence
    and its reverse, each the other's answer)."""
    for sym in "+*":
        if sym in prompt:
            a, b = prompt[:-1].split(sym)
            return (sym, *sorted((int(a), int(b))))
    if prompt[0].isdigit():  # subtraction does not commute: a-b and b-a are two problems
        a, b = prompt[:-1].split("-", 1)
        return ("-", int(a), int(b))
    kind, seq = prompt[:-1].split(":", 1)
    return (kind, {"sort": "".join(sorted(seq)), "reverse": min(seq, seq[::-1])}.get(kind, seq))


# Small problem spaces, so a few thousand draws see nearly every problem and a leak cannot hide.
SMALL = ["synthetic:addition?digits=1", "synthetic:arithmetic?op=mul&digits=1", "synthetic:arithmetic?op=sub&digits=1",
         "synthetic:sort?max_len=4&symbols=4", "synthetic:reverse?max_len=3&symbols=4",
         "synthetic:copy?max_len=3&symbols=4", "synthetic:brackets?max_len=5&kinds=2"]


@pytest.mark.parametrize("spec", SMALL + [s for s in SPECS if "markov" not in s])
def test_no_canonical_problem_is_both_trained_and_held_out(spec):
    task = make_task("data", spec)
    rng = np.random.default_rng(0)
    train = {_canonical(task.sample(rng, "train")[0]) for _ in range(4000)}
    held = {_canonical(task.sample(rng, "val")[0]) for _ in range(400)}
    assert held and len(train) > 2 * len(held)  # both splits drawn, train the larger
    assert not train & held, sorted(train & held)[:5]


def test_held_out_set_does_not_depend_on_the_seed(tmp_path):
    """A seed sweep scores every seed on the same problems: exact match and the synthetic validation rows."""
    from parallel.rules import activate

    mesh = mesh_for(data=1)
    seen = []
    for seed in (0, 1):
        setup = _setup(tmp_path, mesh, seed)
        with activate(mesh):
            problems = TaskEvaluator(setup).jobs[0].problems
        val = np.concatenate([b["inputs"] for b in setup.data.eval_batches(4, np.arange(4))])
        seen.append((problems, val, setup.data.host_batch(0, np.arange(4))["inputs"]))
    (p0, v0, t0), (p1, v1, t1) = seen
    assert p0 == p1 and len(p0) == 12
    np.testing.assert_array_equal(v0, v1)
    assert not np.array_equal(t0, t1)  # training rows do follow the seed


def test_markov_entropy_rate_matches_sampled_sequences():
    task: Markov = make_task("data", "synthetic:markov?states=6&branching=3&length=40")
    rng = np.random.default_rng(0)
    nll, n = 0.0, 0
    for _ in range(2000):
        p, a = task.sample(rng)
        idx = [task.letters.index(c) for c in p + a]
        nll -= sum(np.log(task.P[x, y]) for x, y in zip(idx, idx[1:]))
        n += len(idx) - 1
    assert abs(nll / n - task.entropy_rate) < 0.02 * task.entropy_rate
    assert task.loss_floor == pytest.approx(39 / 40 * task.entropy_rate)


def test_bad_task_specs_are_user_errors():
    for spec, msg in [("synthetic:nope", "unknown synthetic task"), ("synthetic:addition?digts=3", "no parameter"),
                      ("synthetic:addition?digits=x", "must be a int"), ("synthetic:arithmetic?op=pow", "op must")]:
        with pytest.raises(UserError, match=msg):
            make_task("data.sources[0]", spec)


def test_task_rows_pack_problems_and_train_only_answers(tmp_path):
    cfg = DataConfig(mode="packed", path="synthetic:addition?digits=3", cache_dir=str(tmp_path), prefetch=0)
    pipe = PackedPipeline(cfg, batch_size=4, seq_len=64, seed=0)
    task, tok = pipe.tasks[0], pipe.tokenizer
    b = pipe.train_batch(0, np.arange(4))
    eos = tok.special_id("<eos>")
    for r in range(4):
        text = tok.decode(b["inputs"][r][b["segment_ids"][r] > 0])
        problems = [x for x in text.split("<eos>") if x]
        assert len(problems) == 5 and all(task.check(x.split("=")[0] + "=", x.split("=")[1]) for x in problems[:4])
        targets = b["targets"][r][b["weights"][r] > 0]
        assert (targets == eos).sum() == 5 and not np.isin(targets, tok.encode("+=")).any()  # answers + <eos> only
    with pytest.raises(UserError, match="train.seq_len"):
        PackedPipeline(cfg, batch_size=4, seq_len=8, seed=0)


def _setup(tmp_path, mesh, seed: int = 0):
    cfg = Config(model=dataclasses.replace(TINY, vocab_size=0, max_seq_len=32),
                 data=DataConfig(mode="packed", sources=(), path="synthetic:addition?digits=2", eval_problems=12,
                                 cache_dir=str(tmp_path), prefetch=0, synthetic_val_rows=8),
                 train=TrainConfig(batch_size=4, seq_len=32, seed=seed))
    data = PackedPipeline(cfg.data, batch_size=4, seq_len=32, seed=seed)
    cfg = resolve_model(cfg, data.tokenizer.vocab_size)
    mdef = model_def(cfg.model)
    from optim.chains import build_optimizer

    tx, schedule = build_optimizer(cfg.optim, 10)
    return Setup(cfg, mesh, data, mdef, tx, schedule, state_shardings(tx, mdef, mesh), batch_sharding(mesh),
                 StepFlags(mesh))


@pytest.mark.parametrize("devices", [1, 4])
def test_exact_match_uses_greedy_samples(tmp_path, devices, monkeypatch):
    """The evaluator's batched KV-cache decode writes what plain greedy decoding (the whole sequence through the
    model at every step, no cache) writes, and scores it exactly."""
    from parallel.rules import activate

    setup = _setup(tmp_path, mesh_for(data=devices))
    params = setup.mdef.init_params(seed=4)
    with activate(setup.mesh):
        evaluator = TaskEvaluator(setup)
        job = evaluator.jobs[0]
        texts = evaluator.completions(params, job)
        scores = evaluator(params)
    tok, task, problems = setup.data.tokenizer, job[0], job[1]
    new_tokens = max(len(a) for a in tok.encode_batch([a for _, a in problems])) + 1  # the answer and <eos>
    eos = tok.special_id("<eos>")
    expected = []
    for prompt, _ in problems:
        seq = list(tok.encode(prompt))
        for _ in range(new_tokens):
            logits = np.asarray(setup.mdef.apply(params, np.asarray([seq], np.int32)))[0, -1, :tok.vocab_size]
            seq.append(int(np.argmax(logits)))
        out = np.asarray(seq[len(tok.encode(prompt)):])
        stop = np.flatnonzero(out == eos)
        expected.append(tok.decode(out[: stop[0]] if len(stop) else out))
    assert texts == expected
    assert scores["exact_match"] == np.mean([task.check(p, t) for (p, _), t in zip(problems, texts)])

    # An untrained model scores 0, which a scorer ignoring its input would match too: hand the evaluator the true
    # answers for a known subset (wrong ones elsewhere) and check the exact score it reports.
    right = {0, 3, 7}
    graded = [a if i in right else _wrong(a) for i, (_, a) in enumerate(problems)]
    assert [task.check(p, t) for (p, _), t in zip(problems, graded)] == [i in right for i in range(len(problems))]
    seen = []
    monkeypatch.setattr(evaluator, "completions", lambda p, j: seen.append(j) or list(graded))
    with activate(setup.mesh):
        assert evaluator(params) == {"exact_match": len(right) / len(problems)}  # 3 of 12
    assert len(seen) == 1 and seen[0] is job

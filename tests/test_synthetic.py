"""Synthetic tasks: exact checkers, held-out problems, the Markov language's entropy, packed task rows, exact match."""
import dataclasses

import numpy as np
import pytest

from data.config import DataConfig
from data.synthetic import REGISTRY, Markov, eval_problems, held_out, make_task
from data.packed import PackedPipeline
from helpers import TINY, mesh_for
from parallel.errors import UserError
from parallel.mesh import batch_sharding
from train.config import Config, TrainConfig
from train.sample import generate
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
    evals = [p for p, _ in eval_problems(task, 300, seed=0)]
    key = lambda p: held_out(task.name, *map(int, p[:-1].split("+")))  # noqa: E731
    assert not any(map(key, train)) and all(map(key, evals))
    assert not set(train) & set(evals)
    assert evals == [p for p, _ in eval_problems(task, 300, seed=0)]  # the same problems at every eval


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


def _setup(tmp_path, mesh):
    cfg = Config(model=dataclasses.replace(TINY, vocab_size=0, max_seq_len=32),
                 data=DataConfig(mode="packed", sources=(), path="synthetic:addition?digits=2", eval_problems=12,
                                 cache_dir=str(tmp_path), prefetch=0),
                 train=TrainConfig(batch_size=4, seq_len=32))
    data = PackedPipeline(cfg.data, batch_size=4, seq_len=32, seed=0)
    cfg = resolve_model(cfg, data.tokenizer.vocab_size)
    mdef = model_def(cfg.model)
    from optim.chains import build_optimizer

    tx, schedule = build_optimizer(cfg.optim, 10)
    return Setup(cfg, mesh, data, mdef, tx, schedule, state_shardings(tx, mdef, mesh), batch_sharding(mesh))


@pytest.mark.parametrize("devices", [1, 4])
def test_exact_match_uses_greedy_samples(tmp_path, devices, monkeypatch):
    """The evaluator's batched decode writes what train/sample.py's greedy decoding writes, and scores it exactly."""
    from parallel.rules import activate

    setup = _setup(tmp_path, mesh_for(data=devices))
    params = setup.mdef.init_params(seed=4)
    with activate(setup.mesh):
        evaluator = TaskEvaluator(setup)
        job = evaluator.jobs[0]
        texts = evaluator.completions(params, job)
        scores = evaluator(params)
    tok, task, problems = setup.data.tokenizer, job[0], job[1]
    # The evaluator's decode window: the longest prompt plus room for the longest answer and <eos>.
    new_tokens = max(len(a) for a in tok.encode_batch([a for _, a in problems])) + 1
    window = max(len(p) for p in tok.encode_batch([p for p, _ in problems])) + new_tokens
    eos = tok.special_id("<eos>")
    expected = []
    for prompt, _ in problems:
        ids = tok.encode(prompt)
        out = generate(setup.mdef, params, ids, max_new_tokens=new_tokens, window=window,
                       vocab_limit=tok.vocab_size, temperature=0.0)[0, len(ids):]
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

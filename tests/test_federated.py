"""Federated rounds: client partitions, client sampling, DP clipping and noise, and the privacy spent, which must
equal dp-accounting's own figure for the sampling actually done."""
import json

import jax
import numpy as np
import pytest

from data.partition import Clients
from helpers import meshforge
from optim.privacy import noised_mean

TINY = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--train.seq_len", "32",
        "--train.batch_size", "4", "--train.log_every", "2", "--train.eval_every", "0", "--train.eval_batches", "1",
        "--train.checkpoint_every", "0", "--log.progress", "none", "--log.tensorboard", "false",
        "--optim.warmup_steps", "0"]


def test_dirichlet_partition_is_disjoint_complete_and_skewed():
    sizes = [3000, 1000, 2000, 500]
    c = Clients(sizes, 16, 4, "dirichlet", 0.1, seed=0, min_windows=3)
    everything = np.concatenate(c.members)
    assert len(everything) == sum(sizes) and len(np.unique(everything)) == sum(sizes)  # each window once
    source = [np.searchsorted(c.offsets, m, side="right") - 1 for m in c.members]
    top_share = [np.bincount(s, minlength=4).max() / len(s) for s in source]
    assert np.median(top_share) > 0.8  # alpha 0.1: most clients hold (nearly) one source
    iid = Clients(sizes, 16, 4, "iid", 0.1, seed=0, min_windows=3)
    assert max(len(m) for m in iid.members) - min(len(m) for m in iid.members) <= 1
    by_source = Clients(sizes, 4, 2, "source", 0.1, seed=0, min_windows=3)
    assert [len(m) for m in by_source.members] == sizes


def test_rounds_sample_distinct_clients_who_continue_their_own_stream():
    c = Clients([400, 400], 8, 3, "dirichlet", 0.5, seed=1, min_windows=2)
    seen = [c.rounds(k) for k in range(50)]
    assert all(len(set(r)) == 3 for r in seen)
    counts = np.bincount(np.concatenate(seen), minlength=8)
    assert counts.min() > 0  # every client gets its turn
    w = c.weights(50, by_examples=True)
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[0], c.examples[seen[0]] / c.examples[seen[0]].sum())
    # a client's samples over its first epoch are all of its windows, each once
    client = int(np.argmin(c.examples))
    n = len(c.members[client])
    ids = c.window_ids(np.full(n, client), np.arange(n))
    assert sorted(ids) == sorted(c.members[client])
    assert c.rounds_before(10, np.array([client]))[0] == sum(client in r for r in seen[:10])


def test_noise_has_the_stated_scale():
    import jax

    zeros = [np.zeros(200_000, np.float32)]
    out = np.asarray(noised_mean(zeros, jax.random.key(0), clip=0.5, noise=1.5, clients=4)[0])
    assert abs(out.std() - 1.5 * 2 * 0.5 / 4) < 0.01 * (1.5 * 2 * 0.5 / 4)


def test_dp_fedavg_run_spends_what_dp_accounting_says(tmp_path):
    pytest.importorskip("dp_accounting")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    clip, noise, clients, per_round, h = 0.01, 0.7, 8, 2, 2

    def dp_run(name: str, steps: int) -> list[dict]:
        r = meshforge("train", "experiments/federated_noniid.py", "--workdir", tmp_path / name, *TINY,
                      "--train.steps", steps, "--data.cache_dir", tmp_path / "cache", "--mesh.replica", "2",
                      "--outer.replicas", per_round, "--outer.clients", clients, "--outer.inner_steps", h,
                      "--outer.dp_clip", clip, "--outer.dp_noise", noise, devices=2)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [x for x in rows if "loss" in x]

    rows = dp_run("run", 6)
    assert [x["step"] for x in rows] == [2, 4, 6]
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(clients, per_round, dp_accounting.GaussianDpEvent(noise))
    for row in rows:  # one round every h = 2 steps
        accountant.compose(event)
        assert row["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        # every client's update was larger than the bound, and none got through unclipped
        assert row["client_norm_max"] > clip and row["clipped_norm_max"] <= clip * (1 + 1e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dp_epsilon"] == rows[-1]["dp_epsilon"]

    # each round's clients start a fresh inner optimizer state (no client's moments reach another's update); the
    # learning-rate schedule keeps its place
    from helpers import checkpoint_state

    inner = checkpoint_state(tmp_path / "run")["opt_state"]
    inner = inner["inner"] if isinstance(inner, dict) else inner.inner
    leaves = jax.tree_util.tree_flatten_with_path(inner)[0]
    moments = [x for p, x in leaves if any(getattr(k, "key", getattr(k, "name", "")) in ("mu", "nu") for k in p)]
    counts = [x for p, x in leaves if "count" in jax.tree_util.keystr(p)]
    assert moments and all(not np.asarray(x).any() for x in moments)
    assert any((np.asarray(c) == 6).all() for c in counts)  # the schedule's count after 6 steps

    # the noise comes from the OS, not from train.seed: the same command gives another model
    loss_at = {x["step"]: x["loss"] for x in dp_run("again", 4)}
    assert loss_at[2] == rows[0]["loss"] and loss_at[4] != rows[1]["loss"]  # same until the first noise


@pytest.mark.parametrize("args, message", [
    (["--outer.replicas", "3"], "outer.replicas: 3 replicas cannot be spread evenly"),
    (["--outer.replicas", "2", "--outer.inner_steps", "0"], "outer.inner_steps must be >= 1"),
    (["--outer.replicas", "2", "--outer.dp_clip", "1"], "set outer.dp_noise"),
    (["--outer.replicas", "2", "--outer.clients", "4", "--outer.partition", "dirichlet",
      "--outer.partition_key", "label"], "outer.partition_key: 'label'"),
    (["--outer.replicas", "2", "--prune.method", "magnitude"], "prune.method: pruning with outer.replicas"),
])
def test_bad_outer_settings_are_one_line_errors(tmp_path, args, message):
    workdir = tmp_path / "run"
    r = meshforge("train", "experiments/federated_noniid.py", "--workdir", workdir, *TINY, "--train.steps", "2",
                  "--data.cache_dir", tmp_path / "cache", *args, devices=2)  # the experiment's mesh.replica 2
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not workdir.exists()


def test_dirichlet_over_a_label_field_reads_each_window_s_record(tmp_path):
    """Records labelled 'x' hold only x and y letters, 'z' records only z: every window's label is that of the
    record its first token comes from, and alpha 0.1 gives most clients mostly one label."""
    from data.config import DataConfig
    from data.packed import PackedPipeline
    from data.partition import window_labels

    rng = np.random.default_rng(0)
    path = tmp_path / "records.jsonl"
    with path.open("w") as f:
        for i in range(400):
            label = "x" if rng.random() < 0.5 else "z"
            letters = "xy" if label == "x" else "z"
            text = "".join(rng.choice(list(letters), rng.integers(5, 60)))
            f.write(json.dumps({"text": text, "label": label, "id": i}) + "\n")
    cfg = DataConfig(mode="packed", path=str(path), tokenizer="char", cache_dir=str(tmp_path / "cache"))
    pipe = PackedPipeline(cfg, batch_size=4, seq_len=16, seed=0)
    labels = window_labels(pipe, "label")
    src = pipe.sources[0]
    assert len(labels) == src.n_train and set(labels) == {0, 1}
    first = [pipe.tokenizer.decode([t]) for t in src.train_window_at(np.arange(src.n_train)).tokens[:, 0].tolist()]
    for lab, ch in zip(labels, first):
        if ch in "xyz":  # (an end-of-document token carries its record's label too)
            assert lab == (0 if ch in "xy" else 1)
    def median_top_share(partition):
        c = Clients([src.n_train], 4, 2, partition, 0.1, seed=0, min_windows=2, labels=labels)
        return np.median([np.bincount(labels[m], minlength=2).max() / len(m) for m in c.members])

    assert median_top_share("dirichlet") > 0.85 and median_top_share("iid") < 0.65  # skewed by label, not by chance

"""Training with replicas (optim/outer.py, train/rounds.py): the equivalences that pin the outer step down.

- one replica, H = 1, outer SGD at lr 1 is plain training, bit for bit;
- local SGD with H = 1 (inner SGD, outer averaging) is synchronous data parallelism within float32 noise;
- DiLoCo's anchor after a round is Optax's Nesterov step on the mean of independently trained replicas;
- streaming fragments move only their own pieces; compressed outer gradients round-trip within their step.
"""
import dataclasses

import jax
import numpy as np
import optax
import pytest

from data.loader import process_rows, to_global
from helpers import TINY, learnable_batches, logged_losses, mesh_for, train_run
from optim.chains import OptimConfig, build_optimizer
from optim.outer import (OuterConfig, compress, decompress, fragments, layered, piece_get, replicated,
                         sent_bytes)
from parallel.hosts import StepFlags
from parallel.mesh import batch_sharding
from parallel.rules import activate
from train.rounds import make_round_step, round_plan
from train.state import init_state, model_def, state_shardings

SGD = OptimConfig(name="sgd", lr=0.05, b1=0.9, weight_decay=0.1, warmup_steps=0, schedule="constant", clip_norm=0)
ADAMW = OptimConfig(warmup_steps=2, lr=3e-3)


def replica_run(mesh, batches, outer: OuterConfig, optim=ADAMW, model=TINY, steps_total=100, seed=0):
    """Final state as numpy, training on `mesh` with replicas, one step per batch."""
    mdef = model_def(model)
    tx, schedule = build_optimizer(optim, steps_total, mdef.logical_axes())
    tx = replicated(tx, outer, layered(mdef.logical_axes()))
    with activate(mesh):
        shardings = state_shardings(tx, mdef, mesh)
        state = init_state(tx, mdef, shardings, seed)
        bs, flags = batch_sharding(mesh), StepFlags(mesh)
        plan = round_plan(tx, mdef.param_shapes(), steps_total)
        step = make_round_step(mdef, tx, schedule, plan, accum_steps=optim.accum_steps, seed=seed,
                               state_shardings=shardings, batch_sharding=bs, flags_sharding=flags.sharding)
        for b in batches:
            n = len(b["inputs"])
            rows = process_rows(bs, n)
            state, _ = step(state, to_global({k: v[rows] for k, v in b.items()}, bs, n), flags.array())
    return jax.tree.map(np.asarray, state)


def _assert_trees(got, want, atol, what):
    for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_one_replica_one_step_rounds_are_plain_training():
    batches = learnable_batches(6, 4, 16)
    mesh = mesh_for(data=1)
    plain = train_run(mesh, batches, optim=ADAMW)
    fedavg = OuterConfig(replicas=1, inner_steps=1, optimizer="sgd", lr=1.0, momentum=0.0)
    got = replica_run(mesh, batches, fedavg)
    _assert_trees(got["params"], plain.params, 0, "params")  # bit for bit
    _assert_trees(got["opt_state"].replicas, jax.tree.map(lambda x: x[None], plain.params), 0, "replicas")


def test_local_sgd_with_one_step_rounds_is_synchronous_data_parallel():
    """Inner SGD with momentum and weight decay is linear in the gradient, so averaging 4 replicas that each took
    one step on a quarter of the batch is one step on the whole batch (momenta average the same way)."""
    batches = learnable_batches(6, 8, 16)
    plain = train_run(mesh_for(data=1), batches, optim=SGD)
    local = OuterConfig(replicas=4, inner_steps=1, optimizer="sgd", lr=1.0, momentum=0.0)
    got = replica_run(mesh_for(replica=2, data=1), batches, local, optim=SGD)
    _assert_trees(got["params"], plain.params, 1e-5, "params")
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(plain.params),
                                                            jax.tree.leaves(plain.init_params)))
    assert moved > 1e-2  # the comparison is not between two untrained models


def test_diloco_round_is_nesterov_on_the_mean_of_independent_replicas():
    """Two replicas, H = 3: each replica's 3 inner steps (SGD with momentum: AdamW's near-sign updates would turn
    float32 noise in near-zero gradients into whole steps) reproduced by plain training on its own rows, then
    Optax's Nesterov SGD applied by hand to anchor - mean(replicas)."""
    h, batches = 3, learnable_batches(3, 8, 16)
    cfg = OuterConfig(replicas=2, inner_steps=h, optimizer="nesterov", lr=0.7, momentum=0.9)
    got = replica_run(mesh_for(replica=2, data=1), batches, cfg, optim=SGD)
    halves = [train_run(mesh_for(data=1), [{k: v[4 * r:4 * (r + 1)] for k, v in b.items()} for b in batches],
                        optim=SGD) for r in range(2)]
    anchor = halves[0].init_params
    mean = jax.tree.map(lambda a, b: (a + b) / 2, halves[0].params, halves[1].params)
    outer_grad = jax.tree.map(lambda a, m: a - m, anchor, mean)
    tx = optax.sgd(0.7, momentum=0.9, nesterov=True)
    updates, _ = tx.update(outer_grad, tx.init(anchor), anchor)
    want = optax.apply_updates(anchor, updates)
    _assert_trees(got["params"], want, 2e-5, "anchor")
    # every replica restarts from the new anchor; the inner momenta persist (they are not reset), one per replica
    _assert_trees(got["opt_state"].replicas, jax.tree.map(lambda x: np.stack([x, x]), got["params"]), 0, "restart")
    momenta = [x for x in jax.tree.leaves(got["opt_state"].inner) if x.dtype == np.float32 and x.ndim > 1]
    assert momenta and all(x.shape[0] == 2 and np.abs(x[0] - x[1]).max() > 0 for x in momenta)


def test_streaming_fragments_sync_on_their_own_schedule():
    """Two fragments, H = 4: fragment 1 synchronises after step 2, fragment 0 after step 4. After 2 steps only
    fragment 1's pieces of the anchor have moved, to the mean of the two replicas (each reproduced by plain
    training on its own rows), and the replicas restarted from it."""
    model = dataclasses.replace(TINY, scan_layers=True)
    cfg = OuterConfig(replicas=2, inner_steps=4, fragments=2, optimizer="sgd", lr=1.0, momentum=0.0)
    batches = learnable_batches(2, 8, 16)
    got = replica_run(mesh_for(replica=2, data=1), batches, cfg, optim=SGD, model=model)
    halves = [train_run(mesh_for(data=1), [{k: v[4 * r:4 * (r + 1)] for k, v in b.items()} for b in batches],
                        model=model, optim=SGD) for r in range(2)]
    mdef = model_def(model)
    pieces = fragments(jax.tree.leaves(mdef.param_shapes()), jax.tree.leaves(layered(mdef.logical_axes())), 2)
    anchor, start = jax.tree.leaves(got["params"]), jax.tree.leaves(halves[0].init_params)
    replicas = jax.tree.leaves(got["opt_state"].replicas)
    ends = [jax.tree.leaves(h.params) for h in halves]
    assert any(p.start is not None for p in pieces[1])  # the scanned blocks are split by layer
    for p in pieces[0]:  # not yet synchronised
        np.testing.assert_array_equal(piece_get(anchor[p.leaf], p), piece_get(start[p.leaf], p))
    for p in pieces[1]:
        mean = (piece_get(ends[0][p.leaf], p) + piece_get(ends[1][p.leaf], p)) / 2
        np.testing.assert_allclose(piece_get(anchor[p.leaf], p), mean, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(piece_get(replicas[p.leaf][0], p), piece_get(anchor[p.leaf], p))
        assert np.abs(piece_get(anchor[p.leaf], p) - piece_get(start[p.leaf], p)).max() > 0
    sizes = [sum(piece_get(start[p.leaf], p).size for p in f) for f in pieces]
    assert abs(sizes[0] - sizes[1]) <= 0.25 * sum(sizes)  # roughly half the values each


def test_communication_totals_count_every_fragment_sync():
    """Two fragments of H = 4 (syncs after steps 4, 8, 12 and 2, 6, 10), int8 in blocks of 128: the totals after
    12 steps, counted by hand from the leaf sizes."""
    mdef = model_def(dataclasses.replace(TINY, scan_layers=True))
    cfg = OuterConfig(replicas=2, inner_steps=4, fragments=2, send="int8", quant_block=128)
    tx = replicated(build_optimizer(ADAMW, 100, mdef.logical_axes())[0], cfg,
                    layered(mdef.logical_axes()))
    plan = round_plan(tx, mdef.param_shapes(), 12)
    shapes = jax.tree.leaves(mdef.param_shapes())
    per_fragment = []
    for pieces in tx.fragments(mdef.param_shapes()):
        sizes = [int(np.prod(shapes[p.leaf].shape)) if p.start is None else
                 int(np.prod(shapes[p.leaf].shape[1:])) * len(range(p.start, shapes[p.leaf].shape[0], p.step))
                 for p in pieces]
        per_fragment.append(sum(-(-n // 128) * (128 + 4) for n in sizes))
    figures = plan.host_metrics(12)
    assert figures["comm_bytes"] == 2 * 3 * sum(per_fragment)
    assert figures["sync_comm_bytes"] == 2 * 12 * 4 * sum(int(np.prod(s.shape)) for s in shapes)
    assert plan.host_metrics(1)["comm_bytes"] == 0 and plan.host_metrics(2)["comm_bytes"] == 2 * per_fragment[1]


@pytest.mark.parametrize("send", ["bfloat16", "int8", "int4"])
def test_compressed_outer_gradients_round_trip(send):
    x = np.random.default_rng(0).normal(size=(3, 37)).astype(np.float32)  # not a multiple of the block
    block = 16
    payload = compress(x, send, block)
    back = np.asarray(decompress(payload, send, jax.ShapeDtypeStruct(x.shape, np.float32)))
    nbytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(payload))
    assert nbytes == sent_bytes(x.size, send, block)  # what is counted is what is sent
    if send == "bfloat16":
        np.testing.assert_allclose(back, x, rtol=2 ** -8)
        return
    levels = 127 if send == "int8" else 7
    flat = np.pad(x.ravel(), (0, -x.size % block)).reshape(-1, block)
    step = np.repeat(np.abs(flat).max(1) / levels, block)[: x.size].reshape(x.shape)
    assert (np.abs(back - x) <= step / 2 + 1e-7).all()  # within half a quantisation step of its block
    assert np.abs(back - x).max() > 0


# --- through the command: exact resume mid-round, and replicas as separate processes ---------------------------

OUTER = ["train", "experiments/shakespeare_char.py", "--model.d_model", "32", "--model.n_layers", "2",
         "--model.n_heads", "2", "--model.scan_layers", "true", "--train.seq_len", "16", "--train.batch_size", "4",
         "--train.eval_every", "0", "--train.eval_batches", "1", "--log.progress", "none", "--train.log_every", "1",
         "--optim.warmup_steps", "2", "--train.steps", "12", "--train.checkpoint_every", "6",
         "--mesh.replica", "2", "--mesh.data", "1", "--outer.replicas", "2", "--outer.inner_steps", "4"]


# Slow tier for now: under load (2 test workers) the resumed run sometimes aborts in XLA's CPU collective
# rendezvous (two devices at different all-reduces of one program, then the 40 s termination timeout): seen twice
# in four loaded runs this session, never alone. Not understood yet; it must come back to the fast tier.
@pytest.mark.slow
def test_resume_after_sigkill_mid_round_is_exact(tmp_path):
    from helpers import checkpoint_state, meshforge

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = meshforge(*OUTER, "--workdir", straight, devices=2)
    assert r.returncode == 0, r.stderr
    # killed after step 9: the checkpoint at step 6 is half way through the second round (rounds end at 4, 8, 12)
    r = meshforge(*OUTER, "--workdir", killed, devices=2, env={"MESHFORGE_FAULTS": "kill_at_step=9"})
    assert r.returncode != 0
    r = meshforge(*OUTER, "--workdir", killed, devices=2)
    assert r.returncode == 0 and "resuming at step 6" in r.stderr, r.stderr
    assert logged_losses(killed) == logged_losses(straight)
    a, b = checkpoint_state(killed, 12), checkpoint_state(straight, 12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # the anchor is the model that eval and sample load from a run with replicas
    import json

    r = meshforge("eval", "--workdir", straight, devices=2)
    assert r.returncode == 0, r.stderr
    summary = json.loads((straight / "summary.json").read_text())
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    r = meshforge("sample", "--workdir", straight, "--prompt", "RO", "--max-new-tokens", "8", "--mesh.replica", "1",
                  devices=1)  # onto another mesh
    assert r.returncode == 0 and r.stdout.startswith("RO"), r.stderr


def test_bench_prints_the_bytes_beside_synchronous_data_parallel(tmp_path):
    import json

    from helpers import meshforge

    args = [a for a in OUTER if a != "train"]
    r = meshforge("bench", *args, "--steps", "2", "--warmup", "1", "--outer.send", "int8",
                  "--json", tmp_path / "bench.json", devices=2)
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "bench.json").read_text())["communication"]
    # int8 in blocks of 128 (+ a float32 scale each) once every 4 steps against float32 gradients every step
    assert c["inner_steps"] == 4 and 4 * 128 / 132 * 4 * 0.9 < c["reduction"] <= 4 * 4
    assert "replicas" in r.stdout and "synchronous data" in r.stdout


@pytest.mark.compat
def test_two_processes_as_two_replicas_equal_the_simulated_run(tmp_path):
    """Streaming (2 fragments) with 4-bit outer gradients: the int4 payload crosses between the processes."""
    import subprocess
    import sys

    from helpers import REPO, checkpoint_state, cli_env, free_port, meshforge

    args = [*OUTER, "--outer.fragments", "2", "--outer.send", "int4", "--outer.quant_block", "32"]
    simulated, multi = tmp_path / "simulated", tmp_path / "two_processes"
    r = meshforge(*args, "--workdir", simulated, devices=2)
    assert r.returncode == 0, r.stderr
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args), "--workdir", str(multi),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=cli_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    got, want = logged_losses(multi), logged_losses(simulated)
    assert got.keys() == want.keys()
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)
    a, b = checkpoint_state(multi, 12), checkpoint_state(simulated, 12)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
    import json

    summary = json.loads((multi / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["comm_bytes"] * 7 < summary["sync_comm_bytes"]

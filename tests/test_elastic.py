"""A checkpoint written on one mesh continues on another device count and layout with the same losses."""
import numpy as np
import pytest

from data.loader import process_rows, to_global
from helpers import TINY, mesh_for, random_batches
from optim.chains import OptimConfig, build_optimizer
from parallel.mesh import batch_sharding
from parallel.rules import activate
from train.checkpoint import Checkpointer
from train.state import abstract_state, init_state, model_def, state_shardings
from train.step import make_train_step

pytestmark = pytest.mark.compat  # also run on the newest supported stack (.ci/run)


def _run(mesh, state, batches, mdef, tx, schedule):
    with activate(mesh):
        sh = state_shardings(tx, mdef, mesh)
        bs = batch_sharding(mesh)
        step = make_train_step(mdef, tx, schedule, accum_steps=1, seed=0, state_shardings=sh, batch_sharding=bs)
        out = []
        for b in batches:
            rows = process_rows(bs, len(b["inputs"]))
            state, m = step(state, to_global({k: v[rows] for k, v in b.items()}, bs, len(b["inputs"])))
            out.append(float(m["loss"]))
    return state, out


def test_fsdp8_checkpoint_continues_on_data2_tensor2(tmp_path):
    mdef = model_def(TINY)
    tx, schedule = build_optimizer(OptimConfig(warmup_steps=2), 100)
    batches = random_batches(8, batch=16, seq=16)
    big = mesh_for(fsdp=8)
    with activate(big):
        state = init_state(tx, mdef, state_shardings(tx, mdef, big), 0)
    state, _ = _run(big, state, batches[:3], mdef, tx, schedule)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(3, state, {"data": {"step": 3}})
    ckpt.wait()
    _, on_original = _run(big, state, batches[3:], mdef, tx, schedule)

    small = mesh_for(data=2, tensor=2)  # 4 devices, another layout
    with activate(small):
        target = abstract_state(tx, mdef, state_shardings(tx, mdef, small))
        restored, extra = ckpt.restore(3, target)
    assert extra["data"]["step"] == 3
    assert restored["params"]["embed_VD"].sharding.mesh.devices.size == 4
    _, on_other = _run(small, restored, batches[3:], mdef, tx, schedule)
    ckpt.close()
    np.testing.assert_allclose(on_other, on_original, rtol=1e-5)

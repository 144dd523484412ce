"""The same tiny model trained 5 steps on 1 device and on each 8-device layout gives the same losses."""
import numpy as np
import pytest

from helpers import TINY, mesh_for, random_batches, train_losses
from optim.chains import OptimConfig

LAYOUTS = {
    "data=8": dict(data=8),
    "fsdp=8": dict(fsdp=8),
    "tensor=4 x data=2": dict(data=2, tensor=4),
    "data=2 x fsdp=2 x tensor=2": dict(data=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope="module")
def batches():
    return random_batches(5, batch=16, seq=16)


@pytest.fixture(scope="module")
def reference(batches):
    return train_losses(mesh_for(), batches)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_match_single_device(layout, batches, reference):
    losses = train_losses(mesh_for(**LAYOUTS[layout]), batches)
    assert reference[-1] < reference[0]  # it trains
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_scanned_layers_with_remat_match_across_meshes(batches):
    model = TINY.__class__(**{**TINY.__dict__, "scan_layers": True, "remat": "full"})
    ref = train_losses(mesh_for(), batches, model=model)
    got = train_losses(mesh_for(data=2, fsdp=2, tensor=2), batches, model=model)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_accumulation_matches_one_big_batch(batches):
    """Batch 16 in one step equals batch 16 as 4 accumulated micro-batches (also sharded over 2 devices)."""
    one = train_losses(mesh_for(), batches)
    acc = train_losses(mesh_for(), batches, optim=OptimConfig(warmup_steps=2, accum_steps=4))
    acc_dp = train_losses(mesh_for(data=2), batches, optim=OptimConfig(warmup_steps=2, accum_steps=4))
    np.testing.assert_allclose(acc, one, rtol=1e-5)
    np.testing.assert_allclose(acc_dp, one, rtol=1e-5)


def test_accumulation_divides_by_total_weight_once():
    """With uneven padding across micro-batches, sum-then-divide equals the full-batch weighted mean."""
    batches = random_batches(3, batch=8, seq=16, seed=1)
    for b in batches:
        b["weights"][:2, 5:] = 0.0  # rows 0 and 1 fall in different micro-batches: uneven weights
    one = train_losses(mesh_for(), batches)
    acc = train_losses(mesh_for(), batches, optim=OptimConfig(warmup_steps=2, accum_steps=2))
    np.testing.assert_allclose(acc, one, rtol=1e-5)

"""FSDP really shards: with fsdp=8 each device holds about 1/8 of the parameters and optimizer state."""
import jax

from helpers import mesh_for
from models.transformer import ModelConfig
from optim.chains import OptimConfig, build_optimizer
from parallel.rules import activate
from train.state import init_state, model_def, state_shardings


def test_fsdp8_per_device_bytes():
    model = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    mdef = model_def(model)
    tx, _ = build_optimizer(OptimConfig(), 10)
    mesh = mesh_for(fsdp=8)
    with activate(mesh):
        state = init_state(tx, mdef, state_shardings(tx, mdef, mesh), 0)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    per_device = {d: 0 for d in mesh.devices.flat}
    for x in jax.tree.leaves(state):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert total > 4 * 3 * 100_000  # params + two Adam moments of a ~0.1M-parameter model
    assert max(per_device.values()) <= 1.15 * total / 8, (max(per_device.values()), total / 8)

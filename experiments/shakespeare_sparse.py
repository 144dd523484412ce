"""shakespeare_char with 80% of its projection weights pruned during training, or in the 2:4 pattern.

    meshforge train experiments/shakespeare_sparse.py
    meshforge train experiments/shakespeare_sparse.py --prune.method nm --workdir runs/shakespeare_2of4

Hardware: a 2-core laptop/VM CPU, as shakespeare_char. Dense float32 shakespeare_char reaches validation loss
1.7734 at step 2000. Expected (measured on a 2-core AMD EPYC VM):
- gradual magnitude pruning to 80%: validation loss 1.8106 (+0.037 nats)
- 2:4 (two of every four consecutive input weights zero, from step 200): 1.8127 (+0.039 nats)

Pruned: the attention and MLP projections (prune.targets), 786k of the 804k parameters; the embedding (also the
output head) and the norms stay dense. Magnitude pruning follows Zhu & Gupta's cubic schedule from step 200 to
step 1500 (prune.end_step 0: three quarters of the run), updating the masks every 100 steps, one threshold per
matrix; the last 500 steps train the final sparse network. Sparse matrices are stored dense here: this measures
what the sparsity costs in loss, not a speed-up (that needs a sparse kernel or an export, issue 11).
"""
import dataclasses

from experiments.shakespeare_char import get_config as dense_config
from optim.prune import PruneConfig
from train.config import Config


def get_config() -> Config:
    return dataclasses.replace(
        dense_config(), name="shakespeare_sparse",
        prune=PruneConfig(method="magnitude", sparsity=0.8, start_step=200, update_every=100),
    )

"""Character-level GPT on tinyshakespeare with sparse mixture-of-experts MLPs: shakespeare_char's budget.

    meshforge train experiments/shakespeare_moe.py

Hardware: the 2-core CPU of shakespeare_char (2 virtual XLA devices, data-parallel; on 8 devices add
--mesh.expert 4 --mesh.data 2 --train.batch_size 16 to split the experts with all-to-all dispatch).
Expected: validation loss about 1.73 at step 2000 on the whole validation split, below the dense
shakespeare_char's 1.78 at the same step, seed and data. Measured here (2-core CPU shared with other jobs, load
about 5): val_loss 1.7260 vs dense 1.7823 (500: 2.036 vs 2.056, 1000: 1.873 vs 1.923, 1500: 1.777 vs 1.830).
A step costs about 1.7x the dense one on CPU (`meshforge bench`, same load: 141 vs 85 ms): capacity slots and
the dispatch/combine einsums are extra work that a CPU does not hide.

The dense shakespeare_char model with every MLP (4 x 128 -> 512 -> 128) replaced by 4 experts of width 256, each
token routed to its best 2: the same matmul parameters per token as the dense model (2 x 256 = 512 hidden
units), twice the MLP parameters in all. Capacity factor 1.25 (40 slots per expert for the 2 x 64 choices
of a 64-token sequence), load-balancing loss 0.01 and router z-loss 0.001 per layer, as Switch and ST-MoE.
Everything else, including the 2,000 steps of 12 x 64 tokens, is shakespeare_char's.
"""
import dataclasses

from experiments.shakespeare_char import get_config as dense_config
from train.config import Config


def get_config() -> Config:
    cfg = dense_config()
    model = dataclasses.replace(cfg.model, moe_experts=4, moe_top_k=2, moe_d_ff=256, moe_every=1,
                                moe_capacity_factor=1.25, moe_lb_weight=0.01, moe_z_weight=0.001)
    return dataclasses.replace(cfg, model=model)  # the run is named after this file

"""A masked language model (BERT-style) on tinyshakespeare: bidirectional attention inside each speech.

    meshforge train experiments/shakespeare_mlm.py

Hardware: a 2-core CPU (2 virtual XLA devices, data-parallel).
Result (measured 2026-11-26 on that VM while two other jobs shared its 2 cores, load average 4 to 7):
validation loss on the masked tokens 4.897 / 4.214 / 3.548 / 3.348 nats at steps 250 / 500 / 1000 / 1500
(train 3.41, still falling), 11m31s wall, median step 389 ms. For scale: the causal shakespeare_bpe model
predicts the next token at 3.571 nats; seeing both sides of a masked token makes it easier to guess.

Objective: in every 128-token row, 15% of the tokens (never padding or special tokens) are chosen as targets;
80% of those are replaced by <mask>, 10% by a random token and 10% left as they are (BERT). The loss is the
cross-entropy on the chosen tokens only. The model is the same decoder stack with `model.causal false`, so
every token sees its whole speech (segment ids still keep speeches apart). Same data, BPE tokenizer and cache as
experiments/shakespeare_bpe.py; `--data.objective span --model.causal true` trains T5-style span corruption
instead.
"""
from data.config import DataConfig
from models.transformer import ModelConfig
from optim.chains import OptimConfig
from parallel.mesh import MeshConfig
from train.config import Config, LogConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=128, positions="rope", norm="rmsnorm",
                          mlp="gelu", dropout=0.1, tie_embeddings=True, causal=False),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(name="adamw", lr=1e-3, b1=0.9, b2=0.99, weight_decay=0.1, warmup_steps=100,
                          schedule="cosine", min_lr_ratio=0.1, clip_norm=1.0),
        data=DataConfig(mode="packed", path="builtin:tinyshakespeare.txt", split_by="paragraph", tokenizer="bpe",
                        bpe_vocab_size=1024, objective="masked", mask_rate=0.15),
        train=TrainConfig(steps=1500, batch_size=16, seq_len=128, eval_every=250, eval_batches=0,
                          checkpoint_every=500, log_every=50),
        log=LogConfig(),
    )

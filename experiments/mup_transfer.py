"""muP hyperparameter transfer across width: does the best learning rate of a width-64 model hold at width 512?
Char-level GPT on tinyshakespeare, both parametrizations (models/transformer.py, optim/chains.py: muP).

One point of the grid (the file's defaults are the width-64 base model under muP at its best lr, 0.008:
`meshforge train experiments/mup_transfer.py` reaches validation loss 2.234 after 200 steps):

    meshforge train experiments/mup_transfer.py --model.d_model 512 --model.parametrization standard \
        --optim.lr 0.008 --workdir /tmp/mup/standard-512-0.008

The grid runs that command for model.d_model in {64, 512} x model.parametrization in {standard, mup} x optim.lr
in {0.00025, 0.0005, 0.001, 0.002, 0.004, 0.0057, 0.008, 0.016, 0.032, 0.064, 0.128} (factor-2 steps, plus
0.0057 = 0.004 * sqrt 2, added after the first pass to resolve the optimum; width 512 only where it matters), one
run per point, and reads summary.json's final_val_loss: the validation loss after 200 steps on the whole
validation split. Everything else as in get_config: 2 layers, 4 heads at every width (the head size grows, 16 at
64 and 128 at 512), context 64, batch 12, AdamW (0.9, 0.99), weight decay 0.1, 20 warm-up steps then cosine to
lr / 10, clipping at 1.0, tied embeddings, mup_base_width 64.

Hardware: a 2-core "AMD EPYC" VM (lscpu's model name; 2 virtual XLA CPU devices), shared with other jobs while
it ran: a width-512 run (6.4M parameters) took about 3.5 minutes (780 ms per step), a width-64 one (0.11M)
about 15 s; the grid about an hour.

Validation loss (nats per character) after 200 steps; * marks each column's best, - not run:

    optim.lr   standard-64   mup-64   standard-512   mup-512
    0.00025       3.209       3.209       2.192          -
    0.0005        2.823       2.823       2.133*         -
    0.001         2.514       2.514       2.137        2.524
    0.002         2.364       2.364       2.244        2.339
    0.004         2.284       2.284       2.445        2.241
    0.0057        2.252       2.252       2.520        2.217*
    0.008         2.234*      2.234*      2.732        2.292
    0.016         2.755       2.755       2.842        2.524
    0.032         2.614       2.614         -            -
    0.064         2.832       2.832         -            -
    0.128         2.865       2.865         -            -

What it shows, and what it does not:
- At width 64 (= mup_base_width) the two parametrizations are the same model, and give the same losses to the
  last digit.
- Standard parametrization: the best learning rate moves from 0.008 at width 64 to 0.0005 at width 512 (16x
  lower), and the width-64 optimum used at width 512 loses 0.60 nats (2.732 vs 2.133).
- muP: the best learning rate moves from 0.008 to 0.0057, one step of sqrt 2 (on the factor-2 grid alone: from
  0.008 to 0.004, one step); the width-64 optimum used at width 512 loses 0.075 nats (2.292 vs 2.217). So muP
  shrinks the shift from 16x to sqrt 2 here, but the optimum is NOT the same grid point at both widths: transfer
  is approximate at this small base width and this short (200-step) horizon, one run per point (no seeds).
- At this horizon the standard model's best at width 512 (2.133) beats muP's (2.217), and muP's 512 barely beats
  its own width 64 (2.217 vs 2.234). Only the learning rate was tuned at the base; muP's other base constants
  (init_std, the embedding's and readout's multipliers, the attention constant) were left at the standard
  model's values, which muP then carries to every width. Not measured further here.
"""
from data.config import DataConfig
from models.transformer import ModelConfig
from optim.chains import OptimConfig
from parallel.mesh import MeshConfig
from train.config import Config, LogConfig, TrainConfig


def get_config() -> Config:
    return Config(
        # the width grows through the head size (4 heads at every width), as models.transformer.mup_attention_scale
        # assumes; mup_base_width is the width the learning rate is tuned at
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, positions="rope", norm="rmsnorm",
                          mlp="gelu", tie_embeddings=True, parametrization="mup", mup_base_width=64),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(name="adamw", lr=0.008, b1=0.9, b2=0.99, weight_decay=0.1, warmup_steps=20,
                          schedule="cosine", min_lr_ratio=0.1, clip_norm=1.0),
        data=DataConfig(path="builtin:tinyshakespeare.txt", tokenizer="char", val_fraction=0.1),
        train=TrainConfig(steps=200, batch_size=12, seq_len=64, eval_every=0, eval_batches=0,
                          checkpoint_every=0, log_every=50),
        log=LogConfig(progress="none", tensorboard=False),
    )

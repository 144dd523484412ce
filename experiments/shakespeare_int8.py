"""shakespeare_char trained quantization-aware: every attention and MLP projection computes with int8 weights
(one scale per output channel) and int8 inputs (one scale per token), as an int8 deployment would.

    meshforge train experiments/shakespeare_int8.py

Hardware: a 2-core laptop/VM CPU, as shakespeare_char. Expected (measured on a 2-core AMD EPYC VM):
validation loss 1.7780 at step 2000, against 1.7734 for the dense float32 shakespeare_char (+0.26%) and
1.7734 for shakespeare_char's weights quantized after training (`meshforge eval --quantize int8`, weights only).

The fake quantization uses qwix's numerics (absmax scales; models/quant.py) with a straight-through gradient to the
float32 weights, which the checkpoint keeps. On a CPU this only costs time (1.5-2.7 ms per step, 4-7%, bench side
by side); int8 speed-ups need hardware with int8 matmuls, and the export (`meshforge export --quantize int8`)
stores the int8 weights. Needs the edge extra (qwix): pip install -e '.[edge]'.
"""
import dataclasses

from experiments.shakespeare_char import get_config as dense_config
from train.config import Config


def get_config() -> Config:
    cfg = dense_config()
    return dataclasses.replace(cfg, name="shakespeare_int8", model=dataclasses.replace(cfg.model, qat="int8"))

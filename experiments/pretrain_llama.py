"""A small Llama-style model (RoPE, RMSNorm, SwiGLU, grouped-query attention) pretrained on tinyshakespeare with
a byte-level BPE: the pretrained checkpoint of the fine-tuning experiments, exported to a HuggingFace folder.

    meshforge train experiments/pretrain_llama.py
    meshforge export runs/pretrain_llama --format hf --out runs/pretrain_llama_hf

Hardware: a 2-core CPU (2 virtual XLA devices, data-parallel).
Result (measured 2026-11-30 on a 2-core AMD EPYC VM with AVX-512, shared with test runs, load average 3 to 5):
0.79M parameters, validation loss 3.329 / 3.054 / 2.917 / 2.850 nats per token at steps 200 / 400 / 600 / 800
(train loss 2.50); 8m45s wall, median step 557 ms.

The exported folder loads in `transformers.AutoModelForCausalLM.from_pretrained` (LlamaForCausalLM) and is what
experiments/finetune_lora.py and finetune_full.py start from. Any Llama / Qwen2 / Qwen3 / GPT-2 folder from the
hub can take its place (`--train.init_from PATH`), once downloaded.
"""
from data.config import DataConfig
from models.transformer import ModelConfig
from optim.chains import OptimConfig
from parallel.mesh import MeshConfig
from train.config import Config, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, positions="rope",
                          norm="rmsnorm", mlp="swiglu", tie_embeddings=True),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(name="adamw", lr=2e-3, b1=0.9, b2=0.99, weight_decay=0.1, warmup_steps=50,
                          schedule="cosine", min_lr_ratio=0.1, clip_norm=1.0),
        data=DataConfig(mode="packed", path="builtin:tinyshakespeare.txt", split_by="paragraph", tokenizer="bpe",
                        bpe_vocab_size=512, objective="causal"),
        train=TrainConfig(steps=800, batch_size=16, seq_len=128, eval_every=200, eval_batches=0,
                          checkpoint_every=400, log_every=50),
    )

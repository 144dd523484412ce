"""LoRA fine-tuning of a pretrained model on a supervised task: given a line of Shakespeare, write the next one.

    meshforge train experiments/pretrain_llama.py          # the pretrained model (a few minutes on 2 cores)
    meshforge export runs/pretrain_llama --format hf --out runs/pretrain_llama_hf
    meshforge train experiments/finetune_lora.py
    meshforge export runs/finetune_lora --format peft --out runs/finetune_lora_peft   # the adapter, for peft
    meshforge sample --from runs/finetune_lora --prompt $'Next line after: To be, or not to be\n' --temperature 0

Hardware: a 2-core CPU (2 virtual XLA devices, data-parallel).
Result (measured 2026-11-30 on a 2-core AMD EPYC VM with AVX-512, under a load average of 2 to 5), validation
loss on the answers, nats per token, 300 steps of 16 rows x 128 tokens each:

    pretrained model, before fine-tuning                     3.086
    LoRA, rank 4, 4.5% of the parameters trained (this file)  2.900 / 2.889 / 2.884 at steps 100 / 200 / 300
    full fine-tuning (finetune_full.py, lr 3e-4)             2.926 / 2.897 / 2.881
    same model and steps from random weights (lr 1e-3)        4.172 / 3.886 / 3.782

Starting from the pretrained model beats training from scratch by 0.90 nats after the same 300 steps; LoRA,
training 4.5% of the parameters, ends within 0.003 nats of full fine-tuning (full fine-tuning at lr 1e-3 ended
at 2.911, worse than both). 2m54s wall for the LoRA run (median step 329 ms), 1m58s for full fine-tuning
(297 ms): on a model this small the adapters' extra matmuls cost more than the frozen weights' gradients save.

The pretrained model is meshforge's own (experiments/pretrain_llama.py, exported to a HuggingFace Llama folder),
since nothing can be downloaded here. To start from a hub model instead, download it (config.json,
*.safetensors, tokenizer.json) and pass `--train.init_from PATH`: Llama, Qwen2, Qwen3 and GPT-2 folders load.
The architecture and the tokenizer come from that folder; this file's model section only matters without
init_from (the from-scratch baseline). Only the LoRA adapters (rank 4 on every attention and MLP projection,
about 4% of the parameters) train and sit in the optimizer state.

Data: each speech of tinyshakespeare gives (line, next line) pairs, rendered as "Next line after: LINE\n"
followed by the answer and <eos>; the loss is on the answer only; pairs are packed several to a row with
document masking. The last 10% of the pairs are the validation split (the end of the corpus, which the
pretraining run also held out).
"""
from data.config import DataConfig
from models.transformer import ModelConfig
from optim.chains import OptimConfig
from parallel.mesh import MeshConfig
from train.config import Config, TrainConfig

PRETRAINED = "runs/pretrain_llama_hf"


def next_line_pairs():
    """(line, next line) pairs within each speech of the shipped corpus, in corpus order."""
    from data.sources import read_text

    for speech in read_text("builtin:tinyshakespeare.txt").split("\n\n"):
        lines = [line for line in speech.split("\n")[1:] if line.strip()]  # drop the speaker's name
        for a, b in zip(lines, lines[1:]):
            yield {"prompt": a, "response": b}


def get_config() -> Config:
    return Config(
        # The architecture of runs/pretrain_llama_hf (used as is only for the from-scratch baseline).
        model=ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                          positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True,
                          lora_rank=4, lora_alpha=8.0, lora_targets="attn/|mlp/"),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(name="adamw", lr=3e-3, b1=0.9, b2=0.99, weight_decay=0.0, warmup_steps=20,
                          schedule="cosine", min_lr_ratio=0.1, clip_norm=1.0),
        data=DataConfig(mode="packed", path="generator:experiments/finetune_lora.py:next_line_pairs",
                        objective="sft", sft_template="Next line after: {prompt}\n", tokenizer="bpe"),
        train=TrainConfig(steps=300, batch_size=16, seq_len=128, eval_every=100, eval_batches=0,
                          checkpoint_every=300, log_every=25, init_from=PRETRAINED),
    )

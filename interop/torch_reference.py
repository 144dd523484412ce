"""A plain PyTorch (eager) version of meshforge's dense decoder and AdamW step, for side-by-side speed only.

It has the same shapes and the same work per step as `models/transformer.py` for the features it covers
(pre-norm blocks, RMSNorm or LayerNorm, RoPE or learned positions, GELU or SwiGLU MLP, grouped-query attention,
tied or untied head, float32), with an AdamW step, weight-decay groups and gradient clipping as in
`optim/chains.py`. It is never used to train: `meshforge bench --compare torch` times it beside meshforge's step.
torch is imported only here (the `bench` extra).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.transformer import ModelConfig
from optim.chains import OptimConfig


def norm(d: int, kind: str, eps: float, bias: bool) -> nn.Module:
    return nn.RMSNorm(d, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(d, eps=eps, bias=bias)


def rope(x_BNTH, cos_Th, sin_Th):
    x1, x2 = x_BNTH.chunk(2, dim=-1)
    return torch.cat([x1 * cos_Th - x2 * sin_Th, x2 * cos_Th + x1 * sin_Th], dim=-1)


class Block(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        d, h, k, hd = m.d_model, m.n_heads, m.n_kv_heads or m.n_heads, m.head_size
        self.h, self.k, self.hd = h, k, hd
        self.norm1, self.norm2 = (norm(d, m.norm, m.norm_eps, m.use_bias) for _ in range(2))
        self.wqkv = nn.Linear(d, (h + 2 * k) * hd, bias=m.use_bias or m.qkv_bias)
        self.wo = nn.Linear(h * hd, d, bias=m.use_bias)
        self.swiglu = m.mlp == "swiglu"
        self.wi = nn.Linear(d, (2 if self.swiglu else 1) * m.ff_dim, bias=m.use_bias)
        self.wo_mlp = nn.Linear(m.ff_dim, d, bias=m.use_bias)
        self.approximate = "tanh" if m.gelu_approximate else "none"

    def forward(self, x_BTD, cos_Th, sin_Th):
        B, T, _ = x_BTD.shape
        qkv = self.wqkv(self.norm1(x_BTD))
        q, k, v = qkv.split([self.h * self.hd, self.k * self.hd, self.k * self.hd], dim=-1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.k, self.hd).transpose(1, 2)
        v = v.view(B, T, self.k, self.hd).transpose(1, 2)
        if cos_Th is not None:
            q, k = rope(q, cos_Th, sin_Th), rope(k, cos_Th, sin_Th)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.k != self.h)
        x_BTD = x_BTD + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        u = self.wi(self.norm2(x_BTD))
        if self.swiglu:
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u, approximate=self.approximate)
        return x_BTD + self.wo_mlp(u)


class TorchLM(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.m = m
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.pos = nn.Embedding(m.max_seq_len, m.d_model) if m.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.n_layers))
        self.norm = norm(m.d_model, m.norm, m.norm_eps, m.use_bias)
        self.head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False)
        inv = 1.0 / (m.rope_theta ** (torch.arange(0, m.head_size, 2, dtype=torch.float32) / m.head_size))
        self.register_buffer("inv_freq", inv, persistent=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=m.init_std)

    def forward(self, tokens_BT, targets_BT):
        T = tokens_BT.shape[1]
        x = self.embed(tokens_BT)
        cos = sin = None
        if self.pos is not None:
            x = x + self.pos.weight[:T]
        elif self.m.positions == "rope":
            angles = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq
            cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        logits = x @ self.embed.weight.T if self.head is None else self.head(x)
        return F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten())


def optimizer(model: TorchLM, o: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with meshforge's decay mask: matrices decay; norms, biases and (by default) embeddings do not."""
    embeddings = {id(model.embed.weight)} | ({id(model.pos.weight)} if model.pos is not None else set())
    decay, rest = [], []
    for p in model.parameters():
        is_emb = id(p) in embeddings
        (decay if p.dim() > 1 and (o.decay_embeddings or not is_emb) else rest).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kw = dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)  # the fastest CPU AdamW PyTorch has
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kw)


def train_step(model: TorchLM, opt: torch.optim.Optimizer, clip_norm: float, tokens_BT, targets_BT) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(tokens_BT, targets_BT)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return loss


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


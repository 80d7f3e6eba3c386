"""GPT-2: learned positions, pre-LayerNorm, fused qkv with biases, GELU (tanh) MLP, tied head.

HF stores GPT-2's projections as Conv1D (in, out); the loader transposes them to Linear (out, in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from millis.gen.config import GPT2Config
from millis.gen.models.layers import Attention, Batch


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # HF "gelu_new"


class Block(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, c.n_heads, c.head_dim, qkv_bias=True, out_bias=True)
        self.ln_2 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim)

    def forward(self, x: torch.Tensor, b: Batch) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), b, None)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, c: GPT2Config) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.dim)
        self.wpe = nn.Embedding(c.max_seq, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_head:
            self.head.weight = self.wte.weight

    def forward(self, b: Batch) -> torch.Tensor:
        """Logits (B, 1 or T, vocab) in fp32."""
        x = self.wte(b.ids) + self.wpe(b.pos)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, b)
        x = b.last_rows(x)  # (B, 1, dim) unless every position's logits are asked for
        return self.head(self.ln_f(x)).float()

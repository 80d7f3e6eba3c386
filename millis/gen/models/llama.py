"""Llama / Mistral / Qwen2 in one compact module (gpt-fast style): RMSNorm, RoPE, GQA, SwiGLU.

Weights use HF's layout (rotate_half RoPE); the loader fuses q/k/v into `wqkv` and gate/up into
`w13` so each block runs three GEMMs plus the output projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from millis.gen.config import LlamaConfig
from millis.gen.models.layers import Attention, Batch, rope_inv_freq, rope_table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 as HF does, then back: bf16 variance loses too much
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, qkv_bias=c.qkv_bias, out_bias=False)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn = SwiGLU(c.dim, c.hidden_dim)

    def forward(self, x: torch.Tensor, b: Batch, rope) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), b, rope)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_head:
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_table(rope_inv_freq(c), c.max_seq)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq, hs), cast with the model by .to(dtype)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, b: Batch) -> torch.Tensor:
        """Logits (B, 1 or T, vocab) in fp32."""
        x = self.tok_emb(b.ids)                                   # (B, T, dim)
        dtype = x.dtype
        rope = (self.cos[b.pos][:, None].to(dtype), self.sin[b.pos][:, None].to(dtype))  # (B, 1, T, hs)
        for layer in self.layers:
            x = layer(x, b, rope)
        x = b.last_rows(x)  # (B, 1, dim) unless every position's logits are asked for
        return self.head(self.norm(x)).float()

"""A GGUF file's weights dequantized into millis's torch Llama (models/llama.py): the GPU path for GGUF
models (and the CPU reference when the native kernels are off).

GGUF tensor names map back onto millis's layout (the inverse of `load.llama_tensors`: q/k/v fused into
`wqkv`, gate/up into `w13`). llama.cpp's converter permuted the q and k rows of llama / mistral models so
that its RoPE rotates adjacent pairs; the torch model rotates HF's halves (rotate_half), so those rows
are permuted back. qwen2 files keep HF's layout (`rope_neox`).
"""
from __future__ import annotations

import torch

from millis.gen.gguf import GGUFModel, dequantize


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute(w, n_heads)`: rows of each head from (pairs) back to (halves) order.
    llama.cpp: w.reshape(n_heads, 2, hd // 2, ...).swapaxes(1, 2); the inverse swaps (hd // 2, 2) back."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(g: GGUFModel) -> dict[str, torch.Tensor]:
    """fp32 tensors of millis's Llama (tok_emb, layers.i.attn.wqkv ..., norm, head unless tied)."""
    c, t = g.config, g.tensors

    def w(name: str) -> torch.Tensor:
        return dequantize(t[name])

    def qk(name: str, heads: int) -> torch.Tensor:
        x = w(name)
        return x if g.rope_neox else unpermute(x, heads)

    sd = {"tok_emb.weight": w("token_embd.weight"), "norm.weight": w("output_norm.weight")}
    if not c.tie_head:
        sd["head.weight"] = w("output.weight")
    for i in range(c.n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        sd[p + "attn.wqkv.weight"] = torch.cat([qk(b + "attn_q.weight", c.n_heads),
                                                qk(b + "attn_k.weight", c.n_kv_heads), w(b + "attn_v.weight")])
        if c.qkv_bias:
            sd[p + "attn.wqkv.bias"] = torch.cat([qk(b + "attn_q.bias", c.n_heads),
                                                  qk(b + "attn_k.bias", c.n_kv_heads), w(b + "attn_v.bias")])
        sd[p + "attn.wo.weight"] = w(b + "attn_output.weight")
        sd[p + "ffn.w13.weight"] = torch.cat([w(b + "ffn_gate.weight"), w(b + "ffn_up.weight")])
        sd[p + "ffn.w2.weight"] = w(b + "ffn_down.weight")
        sd[p + "attn_norm.weight"] = w(b + "attn_norm.weight")
        sd[p + "ffn_norm.weight"] = w(b + "ffn_norm.weight")
    return sd

"""A Llama-family decode step through millis.gpu.decode_kernels: 9 kernels a layer instead of over 40.

`fused_decode` computes what `Llama.forward` does for one new token per row in rows 0..B-1 of the caches
(GraphedDecode's buckets), with the residual adds folded into the next RMSNorm: the stream is x + the
previous block's output, normalised in the same kernel. The matmuls stay the model's own modules (cuBLAS,
or the weight-only kernels). Used on CUDA with Triton (`usable`); the torch forward is the reference.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from millis.gpu import decode_kernels as dk


def usable(model: nn.Module) -> bool:
    """A Llama-family model on CUDA with Triton whose head size is a power of two of at least 16 (the kernels'
    tl.arange and tl.dot; 48 or 80-wide heads keep the torch step), unless MILLIS_NO_FUSED_DECODE=1 (the A/B
    switch)."""
    from millis.gen.models.llama import Llama

    if not isinstance(model, Llama) or dk.triton is None or os.environ.get("MILLIS_NO_FUSED_DECODE") == "1":
        return False
    a = model.layers[0].attn
    pow2 = a.hs >= 16 and a.hs & (a.hs - 1) == 0
    return next(model.parameters()).device.type == "cuda" and pow2 and a.nh % a.nkv == 0


def fused_decode(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, kv_len: int, window: int,
                 scratch: int) -> torch.Tensor:
    """ids, pos (B, 1) of cache rows 0..B-1 -> logits (B, vocab) fp32; `scratch`: the idle rows' position."""
    c = model.config
    p = pos[:, 0].contiguous()
    x = model.tok_emb(ids[:, 0])                                         # (B, D)
    res = None
    for layer in model.layers:
        a = layer.attn
        x, h = dk.add_rmsnorm(x, res, layer.attn_norm.weight, c.norm_eps)
        q = dk.rope_cache(a.wqkv(h), p, model.cos, model.sin, a.cache.k, a.cache.v, a.nh, a.nkv)
        o = a.wo(dk.decode_attention(q, a.cache.k, a.cache.v, p, kv_len, window, scratch))
        x, h = dk.add_rmsnorm(x, o, layer.ffn_norm.weight, c.norm_eps)
        res = layer.ffn.w2(dk.swiglu(layer.ffn.w13(h)))
    _, h = dk.add_rmsnorm(x, res, model.norm.weight, c.norm_eps)
    return model.head(h).float()

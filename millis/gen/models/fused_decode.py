"""A Llama-family decode step through Triton kernels: 8 kernels a layer instead of over 40, 5 at batch 1.

`fused_decode` computes what `Llama.forward` does for one new token per row in rows 0..B-1 of the caches
(GraphedDecode's buckets). Batches of several rows (millis.gpu.decode_kernels) fold the residual adds into
the next RMSNorm (the stream is x + the previous block's output, normalised in the same kernel) and keep the
model's own matmul modules (cuBLAS, or the weight-only kernels). One row (millis.gpu.decode_gemv, plain or
weight-only weights) takes the norms into the matmuls that read them, the residual adds into the
matmuls that produce them and SwiGLU into gate/up. Used on CUDA with Triton (`usable`); the torch forward
is the reference.
"""
from __future__ import annotations


import torch
from torch import nn

from millis.gpu import decode_gemv as dg
from millis.gpu import decode_layer as dl
from millis.gpu import decode_kernels as dk
from millis.common.config import env_switch


def usable(model: nn.Module) -> bool:
    """A Llama-family model on CUDA with Triton whose head size is a power of two of at least 32 (the kernels'
    aranges, and tl.dot over half a head; 48 or 80-wide heads keep the torch step), unless
    MILLIS_NO_FUSED_DECODE=1 (the A/B switch)."""
    from millis.gen.models.llama import Llama

    if not isinstance(model, Llama) or dk.triton is None or env_switch("MILLIS_NO_FUSED_DECODE"):
        return False
    a = model.layers[0].attn
    pow2 = a.hs >= 32 and a.hs & (a.hs - 1) == 0
    return next(model.parameters()).device.type == "cuda" and pow2 and a.nh % a.nkv == 0


def gemv_usable(model: nn.Module) -> bool:
    """The batch-1 path reads a Llama's weights itself: every matmul an nn.Linear or a weight-only format
    (millis.gpu.weight_only), contiguous, bias only on qkv (Qwen2), unless MILLIS_NO_DECODE_GEMV=1 (the A/B
    switch)."""
    from millis.gen.models.llama import Llama
    from millis.gpu.weight_only import WeightOnlyLinear

    if not isinstance(model, Llama):
        return False

    def plain_or_packed(m: nn.Module) -> bool:
        return (type(m) is nn.Linear and m.weight.is_contiguous()) or isinstance(m, WeightOnlyLinear)

    if env_switch("MILLIS_NO_DECODE_GEMV") or not plain_or_packed(model.head) \
            or model.head.bias is not None:
        return False
    for layer in model.layers:
        mods = (layer.attn.wqkv, layer.attn.wo, layer.ffn.w13, layer.ffn.w2)
        if not all(map(plain_or_packed, mods)) or any(m.bias is not None for m in mods[1:]):
            return False
    return True


def gemv_shapes(model: nn.Module) -> list[tuple[nn.Module, bool, bool]]:
    """(linear, norm, gateup) of each kind of batch-1 matmul, for decode_gemv.tune."""
    layer = model.layers[0]
    return [(layer.attn.wqkv, True, False), (layer.attn.wo, False, False), (layer.ffn.w13, True, True),
            (layer.ffn.w2, False, False), (model.head, True, False)]


def fused_decode(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, kv_len: int, window: int,
                 one_row: bool | None = None, per_layer: bool | None = None) -> torch.Tensor:
    """ids, pos (B, 1) of cache rows 0..B-1 -> logits (B, vocab) fp32. one_row: `gemv_usable(model)`; per_layer:
    one kernel a layer at batch 1 (`decode_layer.usable`); a caller stepping the same model may decide both
    once (None: decided here)."""
    if ids.shape[0] == 1 and (gemv_usable(model) if one_row is None else one_row):
        per_layer = dl.usable(model) if per_layer is None else per_layer
        return _one_row(model, ids, pos, kv_len, window, per_layer)
    c = model.config
    p = pos[:, 0].contiguous()
    x = model.tok_emb(ids[:, 0])                                         # (B, D)
    res = None
    for layer in model.layers:
        a = layer.attn
        x, h = dk.add_rmsnorm(x, res, layer.attn_norm.weight, c.norm_eps)
        o = dk.rope_attention(a.wqkv(h), p, model.cos, model.sin, a.cache.k, a.cache.v, a.nh, a.nkv, kv_len, window)
        x, h = dk.add_rmsnorm(x, a.wo(o), layer.ffn_norm.weight, c.norm_eps)
        res = layer.ffn.w2(dk.swiglu(layer.ffn.w13(h)))
    _, h = dk.add_rmsnorm(x, res, model.norm.weight, c.norm_eps)
    return model.head(h).float()


def _one_row(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor, kv_len: int, window: int,
             per_layer: bool) -> torch.Tensor:
    p = pos[:, 0].contiguous()
    x = model.tok_emb(ids[0, 0:1])[0]                                    # (D,): the residual stream, updated in place
    if per_layer:  # one kernel a layer (decode_layer), its barrier counters zeroed once a step
        dl.sync_state(model)[0].zero_()
    for i, layer in enumerate(model.layers):
        if per_layer:
            dl.layer_step(x, layer, i, model, p, kv_len, window)
        else:
            five_kernel_layer(x, layer, model, p, kv_len, window)
    return dg.gemv(x, model.head, model.norm.weight, model.config.norm_eps, out_f32=True)[None]   # (1, vocab)


def five_kernel_layer(x: torch.Tensor, layer: nn.Module, model: nn.Module, p: torch.Tensor, kv_len: int,
                      window: int) -> None:
    """One layer of the batch-1 step on x (D,) in place, at position p (1,): decode_gemv's matmuls around the
    attention kernel."""
    a, f, eps = layer.attn, layer.ffn, model.config.norm_eps
    qkv = dg.gemv(x, a.wqkv, layer.attn_norm.weight, eps)
    o = dk.rope_attention(qkv[None], p, model.cos, model.sin, a.cache.k, a.cache.v, a.nh, a.nkv, kv_len, window,
                          chained=True)
    dg.gemv(o[0], a.wo, resid=x)
    h = dg.gemv(x, f.w13, layer.ffn_norm.weight, eps, gateup=True)
    dg.gemv(h, f.w2, resid=x)


def layer_us(model: nn.Module, kv_len: int, window: int) -> dict:
    """On CUDA: the batch-1 step's layers in one kernel each (decode_layer, its tuned tiles; the barrier
    counters zeroed once, as a step does) and in five each, timed in CUDA graphs at the scratch position (the
    cache's last, which no request reaches): {"per_layer": us, "five_kernels": us}. The engine keeps the
    faster."""
    from millis.gpu.graph_timing import graph_us

    x0, x, p = dl.scratch_row(model)
    bars = dl.sync_state(model)[0]

    def one() -> None:
        x.copy_(x0)
        bars.zero_()
        for i, layer in enumerate(model.layers):
            dl.layer_step(x, layer, i, model, p, kv_len, window)

    def five() -> None:
        x.copy_(x0)
        for layer in model.layers:
            five_kernel_layer(x, layer, model, p, kv_len, window)

    with torch.inference_mode():
        return {"per_layer": round(graph_us(one, calls=4), 2), "five_kernels": round(graph_us(five, calls=4), 2)}

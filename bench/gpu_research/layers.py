"""Research variants of millis.gpu's encoder layer, measured against it by bench/gpu_encoders.py.

Each is a drop-in for `millis.gpu.encoder.layer_forward` (same signature), set as `Encoder.layer`:
- "triton-gemm": at few tokens (<= gemm.MAX_M) the layer's output, FFN-in and FFN-out GEMMs are the
  Triton kernels of gemm.py (split-K partials summed inside add_ln; bias + exact GELU in the FFN-in
  GEMM's epilogue): 6 launches a layer instead of 7. Faster alone, not inside the model (gemm.py).
- "gelu-tanh": the FFN-in GEMM applies bias and the tanh-approximated GELU itself
  (torch._addmm_activation -> cuBLASLt's epilogue): one launch less a layer, and a different function
  from BERT's exact GELU (a fidelity trade).
- "compile": the torch layer (torch epilogues) compiled by Inductor, which fuses the same epilogues.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from millis.common.errors import MillisError
from millis.encoder.source import Pooling
from millis.gpu import kernels
from millis.gpu.encoder import Encoder, LayerWeights, RunOptions, attention, from_hf, layer_forward

from . import gemm

LAYERS = ("triton-gemm", "gelu-tanh", "compile")


def small_gemm_layer(x: torch.Tensor, attn_bias: torch.Tensor | None, lw: LayerWeights, B: int, T: int,
                     heads: int, eps: float, fused: bool) -> torch.Tensor:
    """layer_forward with gemm.py's Triton GEMMs where the shapes allow (fused, CUDA), else layer_forward."""
    M, H = x.shape
    inter = lw.w1.shape[0]
    if not (fused and all(gemm.supported(M, n, k) for n, k in ((H, H), (inter, H), (H, inter)))):
        return layer_forward(x, attn_bias, lw, B, T, heads, eps, fused)
    a = attention(x, attn_bias, lw, B, T, heads)
    x = kernels.add_ln(gemm.linear_partials(a.contiguous(), lw.wo), lw.bo, x, lw.ln1w, lw.ln1b, eps)
    f = gemm.linear_gelu(x, lw.w1, lw.b1)                                   # (B*T, I)
    return kernels.add_ln(gemm.linear_partials(f, lw.w2), lw.b2, x, lw.ln2w, lw.ln2b, eps)


def gelu_tanh_layer(x: torch.Tensor, attn_bias: torch.Tensor | None, lw: LayerWeights, B: int, T: int,
                    heads: int, eps: float, fused: bool) -> torch.Tensor:
    """layer_forward with bias + tanh-GELU in the FFN-in GEMM's epilogue."""
    add_ln = kernels.add_ln if fused else kernels.add_ln_torch
    a = attention(x, attn_bias, lw, B, T, heads)
    x = add_ln(F.linear(a, lw.wo), lw.bo, x, lw.ln1w, lw.ln1b, eps)
    if x.is_cuda:
        f = torch._addmm_activation(lw.b1, x, lw.w1.t(), use_gelu=True)     # (B*T, I)
    else:  # the CPU's _addmm_activation uses the exact GELU: write out what CUDA computes
        f = F.gelu(F.linear(x, lw.w1, lw.b1), approximate="tanh")
    return add_ln(F.linear(f, lw.w2), lw.b2, x, lw.ln2w, lw.ln2b, eps)


_compiled_layer = None


def compiled_layer() -> Callable:
    """layer_forward through Inductor (default mode: cuBLAS GEMMs, fused epilogues), compiled once
    per shape; weights are arguments, so all layers share one compiled graph."""
    global _compiled_layer
    if _compiled_layer is None:
        import torch._dynamo

        for k in ("cache_size_limit", "recompile_limit"):  # one entry per (B, T, H, dtype)
            if hasattr(torch._dynamo.config, k):
                setattr(torch._dynamo.config, k, 256)
        _compiled_layer = torch.compile(layer_forward, dynamic=False, fullgraph=True)
    return _compiled_layer


def research_encoder(model, task: str, pooling: Pooling, layer: str, dtype: str = "fp16",
                     device: str = "cuda") -> Encoder:
    """millis.gpu's encoder (from an HF directory or model, as `from_hf`) running the research `layer`.
    "compile" keeps the torch epilogues (Inductor fuses them) and needs CUDA."""
    if layer not in LAYERS:
        raise MillisError(f"unknown research layer {layer!r}; supported: {', '.join(LAYERS)}")
    if layer == "compile" and device != "cuda":
        raise MillisError("the compiled layer is for CUDA")
    enc = from_hf(model, task, pooling, RunOptions(dtype=dtype, fuse="torch" if layer == "compile" else "triton",
                                                   device=device))
    enc.layer = small_gemm_layer if layer == "triton-gemm" else gelu_tanh_layer if layer == "gelu-tanh" \
        else compiled_layer()
    return enc

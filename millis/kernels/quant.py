"""Int8 for CPU decode: every Linear (the head included) gets int8 weights, one scale per output row.

Two backends, picked by `EngineConfig.quant`:
- `int8`: millis's AVX2 kernel (`millis.kernels.cpu_int8`: int8 activations with one scale per row, so
  a row's tokens do not depend on its batch-mates); when it cannot be built here (no AVX2, no C
  compiler), torch's dynamic quantization instead, with a warning;
- `int8-torch`: torch's dynamic quantization (fbgemm): activations quantized per call with one
  scale per tensor, so in a batch a row's int8 rounding depends on the other rows.
Measured on this AVX2 CPU (GPT-2-124M shape, batch 1 decode, 2 threads): see docs/generation.md's CPU
decode table (bench/generation.py). The embedding stays fp32.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module, backend: str = "auto") -> str:
    """Quantize `model`'s Linears in place; returns the backend used ("millis-avx2" or "torch-dynamic")."""
    from millis.kernels.cpu_int8 import Int8Linear, library, why_unavailable

    if backend in ("auto", "millis") and library() is not None:
        _swap(model, Int8Linear)
        return "millis-avx2"
    if backend == "millis":
        raise RuntimeError(f"millis's int8 kernel is unavailable: {why_unavailable()}")
    if backend == "auto":
        warnings.warn(f"millis's int8 kernel is unavailable ({why_unavailable()}): using torch's dynamic "
                      f"quantization", stacklevel=2)
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch 2.13 marks quantized tensors as deprecated
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return "torch-dynamic"


def _swap(module: nn.Module, cls) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, cls(child))
        else:
            _swap(child, cls)

"""Int8 for CPU decode: torch's dynamic quantization of every Linear (the head included).

Weights are int8 per output channel; activations are quantized per call to uint8 with one scale
per input tensor, and the GEMM runs in int8 (fbgemm, AVX2 here). On this AVX2 CPU it decoded a
GPT-2-124M-shaped model at batch 1 in 18 ms/token against 137 ms for weight-only
`torch._weight_int8pack_mm` with fp32 activations (31 ms with bf16 ones) and 44 ms for fp32
(bench/generation.py). The embedding stays fp32.

The activation scale is per tensor, so in a batch a row's int8 rounding depends on the other rows:
unlike fp32, int8 greedy tokens can differ between a row run alone and in a batch.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch 2.13 marks quantized tensors as deprecated
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)

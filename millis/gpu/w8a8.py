"""W8A8 GEMMs for the GPU encoder (`RunOptions.gemm` int8 / fp8): weights quantized per output channel at
load, activations per token (row) at run time, integer (int8) or fp8 (e4m3) products, fp32 scaling.

Numerics, the same in the torch path and the kernel (w8a8_kernels.py):
- weights: millis.gpu.weight_only.quantize_channel, w ~ q * s_w[n] (int8 in -127..127, fp8 e4m3);
- activations: per row, amax = max|x| (at least 1e-12), v = x * (QMAX / amax); int8 rounds half away from
  zero (trunc(v +- 0.5)), fp8 casts to e4m3 (round to nearest even); s_x = amax / QMAX;
- y = (xq . wq) * s_x[m] * s_w[n] (+ bias) (GELU), written in x's dtype. int8 sums are exact (int32);
  fp8 sums are fp32, except that Hopper's fp8 tensor-core dot (tiles of 64+ rows) adds each BK-wide block
  at reduced precision before the fp32 accumulator takes it (about 1e-4 relative).

The torch path here (`linear_torch`: torch._int_mm / torch._scaled_mm on CUDA, _int_mm and fp32 sums of fp8 on CPU) is
the reference and the CPU stand-in: CI runs the int8 / fp8 encoder end to end with it. The encoder's layers
call w8a8_kernels.linear, which picks the Triton kernel or this path.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from millis.common.errors import MillisError
from millis.gpu.weight_only import FP8_MAX, quantize_channel

GEMMS = ("fp", "int8", "fp8")  # fp: the model's dtype (cuBLAS); int8 / fp8: W8A8 (this module)
QMAX = {"int8": 127.0, "fp8": FP8_MAX}
ROW_FLOOR = 1e-12                 # an all-zero row still gets a finite scale


class QuantWeight(NamedTuple):
    fmt: str             # int8 | fp8
    q: torch.Tensor      # (N, K) int8 or float8_e4m3fn
    scale: torch.Tensor  # (N,) fp32


def quantize_weight(w: torch.Tensor, fmt: str) -> QuantWeight:
    """w (N, K) float (quantized from fp32: pass the checkpoint's weights, not an fp16 copy)."""
    if fmt not in QMAX:
        raise MillisError(f"W8A8 format must be one of {', '.join(QMAX)}, got {fmt!r}")
    q, scale = quantize_channel(w, fmt)
    return QuantWeight(fmt, q.contiguous(), scale.contiguous())


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> xq (M, K) int8 / float8_e4m3fn, s_x (M,) fp32, as the kernel quantizes its tiles."""
    xf = x.float()
    amax = xf.abs().amax(1).clamp_min(ROW_FLOOR)                          # (M,)
    v = xf * (QMAX[fmt] / amax)[:, None]                                  # |v| <= QMAX
    if fmt == "int8":
        xq = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5)).to(torch.int8)
    else:
        xq = v.to(torch.float8_e4m3fn)
    return xq, amax / QMAX[fmt]


def epilogue(acc: torch.Tensor, sx: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, gelu: bool,
             dtype: torch.dtype) -> torch.Tensor:
    """acc (M, N) integer or fp32 sums -> scaled (+ bias) (GELU, erf) in `dtype`."""
    y = acc.float() * sx[:, None] * w.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y)
    return y.to(dtype)


def matmul_torch(xq: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """xq (M, K) . wq^T -> (M, N): int32 (int8) or fp32 (fp8) sums, by torch's own quantized GEMMs."""
    M, K = xq.shape
    if w.fmt == "fp8" and xq.is_cuda and (K % 16 or w.q.shape[0] % 16):
        raise MillisError(f"cuBLAS fp8 GEMMs need K and N divisible by 16, got K={K}, N={w.q.shape[0]}")
    pad = 32 - M if xq.is_cuda and M < 32 else 0  # cuBLASLt int8 wants more than 16 rows
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
    if w.fmt == "int8":
        acc = torch._int_mm(xq, w.q.t())
    elif not xq.is_cuda:  # e4m3 x e4m3 products are exact in fp32; oneDNN's CPU fp8 GEMM took 5.5 s for
        acc = xq.float() @ w.q.float().t()  # 256x384x1536 on Sapphire Rapids (AMX), against 6 ms for this
    else:
        one = torch.ones((), device=xq.device, dtype=torch.float32)
        acc = torch._scaled_mm(xq, w.q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return acc[:M]


def linear_torch(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None,
                 gelu: bool = False) -> torch.Tensor:
    xq, sx = quantize_rows(x, w.fmt)
    return epilogue(matmul_torch(xq, w), sx, w, bias, gelu, x.dtype)


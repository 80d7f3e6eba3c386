"""The Triton W8A8 GEMM of the GPU encoder (numerics in millis.gpu.w8a8): y (M, N) = x (M, K) @ W^T with
the activations quantized inside the kernel, so an int8 / fp8 layer launches as many kernels as fp16's.

A program owns a BM x BN tile of y. Pass 1 reads its BM rows of x (fp16 / bf16, from L2: a layer's x is
at most a few MB) for their absolute maxima; pass 2 reads them again, quantizes each BM x BK block in
registers, and multiplies it with the weights' BN x BK block on the tensor cores: int8 x int8 -> int32, or
fp8 x fp8 -> fp32 (UPCAST: both converted to fp16 first, exactly: a tuning candidate, and what Triton's
interpreter can check). The epilogue scales by s_x[m] * s_w[n], adds the bias, applies GELU and writes x's dtype.

Which tile a shape gets is measured at load (`tune`, CUDA graphs of each candidate, the torch path of
cuBLAS's own int8 / fp8 GEMMs among them) and kept per `tune_key`; untuned shapes take DEFAULT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from millis.gpu.graph_timing import time_candidates
from millis.gpu.w8a8 import QMAX, ROW_FLOOR, QuantWeight, linear_torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None


if triton is not None:
    ROW_FLOOR_ = tl.constexpr(ROW_FLOOR)  # a global a kernel reads must be a constexpr

    @triton.jit
    def _w8a8_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym, qmax,
                     FP8: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm = rm[:, None] < M
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):  # pass 1: each row's max |x|
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=mm & (kk[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        amax = tl.maximum(amax, ROW_FLOOR_)
        inv = qmax / amax                                                  # (BM,)
        if FP8:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):  # pass 2: quantize the block, multiply
            kk = k0 + rk
            v = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=mm & (kk[None, :] < K),
                        other=0.0).to(tl.float32) * inv[:, None]
            w = tl.load(w_ptr + rn[:, None] * swn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            if FP8:
                xq = v.to(tl.float8e4nv)
                if UPCAST:
                    acc += tl.dot(xq.to(tl.float32).to(tl.float16), tl.trans(w.to(tl.float32).to(tl.float16)))
                else:
                    acc += tl.dot(xq, tl.trans(w))
            else:
                xq = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int8)      # round half away from zero
                acc += tl.dot(xq, tl.trans(w), out_dtype=tl.int32)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * (amax / qmax)[:, None] * ws[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GELU:
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mm & (rn[None, :] < N))


DEFAULT = {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3}
# candidates `tune` times: from small tiles (96 programs at BERT-base b1 x s128's M=128, N=768: a 132-SM GPU
# is filled, each program's K loop is short work) to large batches' 128 x 128, fp8 also upcast to fp16, and
# cuBLAS through the torch path
CANDIDATES = [
    {"BM": 16, "BN": 64, "BK": 256, "num_warps": 4, "num_stages": 2},
    {"BM": 32, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 3},
    {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
    DEFAULT,
    {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
    {"torch": True},
]
FP8_EXTRA = [{**DEFAULT, "UPCAST": True}, {**CANDIDATES[2], "UPCAST": True}]
TUNED: dict[tuple[str, int, int, int], dict] = {}  # tune_key -> the config `tune` measured fastest


def tune_key(fmt: str, n: int, k: int, rows: int) -> tuple[str, int, int, int]:
    """TUNED's key: the rows rounded up to a power of two (>= 16)."""
    return fmt, n, k, max(16, 1 << (rows - 1).bit_length())


def kernel_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, gelu: bool = False,
                  config: dict | None = None) -> torch.Tensor:
    """x (M, K), unit stride along K -> (M, N) in x's dtype. config: a tile (BM, BN, BK, num_warps,
    num_stages, UPCAST) or {"torch": True}; None = this shape's tuned config, else DEFAULT."""
    M, K = x.shape
    N = w.q.shape[0]
    if config is None:
        config = TUNED.get(tune_key(w.fmt, N, K, M), DEFAULT)
    if config.get("torch"):
        return linear_torch(x, w, bias, gelu)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    c = {**DEFAULT, **config}
    grid = (triton.cdiv(N, c["BN"]), triton.cdiv(M, c["BM"]))
    _w8a8_kernel[grid](x, w.q, w.scale, bias if bias is not None else w.scale, y, M, N, K, x.stride(0),
                       w.q.stride(0), y.stride(0), QMAX[w.fmt], FP8=w.fmt == "fp8", UPCAST=bool(c.get("UPCAST")),
                       HAS_BIAS=bias is not None, GELU=gelu, BM=c["BM"], BN=c["BN"], BK=c["BK"],
                       num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None,
           gelu: bool = False, kernel: bool = False) -> torch.Tensor:
    """The encoder's GEMMs: x (M, K) -> (M, N) in x's dtype. A tensor w: F.linear (bias and GELU applied here
    only when asked: the fp16 layer fuses them into its own epilogue kernels). A QuantWeight: W8A8, through
    the Triton kernel when `kernel` (the encoder on CUDA) and Triton is installed, else the torch path."""
    if not isinstance(w, QuantWeight):
        y = F.linear(x, w, bias)
        return F.gelu(y) if gelu else y
    if kernel and triton is not None:
        return kernel_linear(x, w, bias, gelu)
    return linear_torch(x, w, bias, gelu)


def tune(weights: list[QuantWeight], rows: tuple[int, ...], dtype: torch.dtype) -> dict:
    """Measure the candidates on each distinct (format, N, K) of `weights` (on CUDA) at each of `rows`, keep
    the fastest in TUNED and return {TUNED key: [(config, us), ...]}, fastest first. Timed without bias or
    GELU (the epilogue costs every tile alike), so only the chosen tiles compile their epilogue variants.
    Shapes already tuned are skipped; a candidate Triton or cuBLAS refuses is passed over."""
    out = {}
    shapes = {(w.fmt, w.q.shape[0], w.q.shape[1]): w for w in weights}
    for (fmt, n, k), w in shapes.items():
        for M in sorted({tune_key(fmt, n, k, r)[3] for r in rows}):
            key = tune_key(fmt, n, k, M)
            if key in TUNED:
                continue
            x = torch.randn(M, k, device=w.q.device, dtype=dtype)
            timed = time_candidates(CANDIDATES + (FP8_EXTRA if fmt == "fp8" else []),
                                    lambda cand: kernel_linear(x, w, None, False, cand))
            if timed:
                out[key] = timed
                TUNED[key] = timed[0][0]
    return out

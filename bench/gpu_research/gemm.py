"""Research: Triton GEMMs for small token counts, where cuBLAS leaves most of the GPU idle.

At b1 x s128 a layer's GEMMs have M = 128 rows: cuBLAS tiles them into 24..96 blocks on a 132-SM
GPU and walks K serially (measured on an H100: 3.9..7.1 us each against a 0.5..1.9 us bytes floor).
Two shapes of kernel fix that without extra launches:
- split-K partials: `linear_partials` cuts K into S slices, each block writes an fp32 partial
  (S, M, N); the consumer (kernels.add_ln) sums the S partials while it adds bias and residual.
- bias + exact GELU in the epilogue: `linear_gelu` writes gelu(x @ w.T + b), so the FFN's
  separate bias+GELU kernel disappears.
Large M (batched requests) stays on cuBLAS, which is near the tensor cores' peak there.

Measured on an H100 (bench/gpu_gemm_sweep.py, then bench/gpu_encoders.py): alone, with the weights
warm in L2, these beat cuBLAS at M = 16..128 (BERT-base M=128: 3.3 / 5.6 / 5.0 us against 3.5 /
6.6 / 6.9); inside the model, weights cold and add_ln reading S fp32 partials, they did not
(b1 x s128: 0.552 ms against 0.537 with cuBLAS). So millis's encoder uses cuBLAS only, and these
kernels live here, in the benches: `layers.small_gemm_layer` runs the encoder on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from millis.gpu.kernels import triton

MAX_M = 512          # above this, cuBLAS (see the module docstring)
TARGET_BLOCKS = 160  # split K until the grid has about this many blocks (132 SMs on an H100)


@dataclass(frozen=True)
class GemmConfig:
    bm: int              # rows of x per block
    bn: int              # rows of w (output columns) per block
    bk: int              # K step
    splits: int = 1      # K slices (fp32 partials); 1 for the fused-epilogue kernel
    warps: int = 4
    stages: int = 3


def supported(M: int, N: int, K: int) -> bool:
    """Shapes these kernels take: few rows, and K a multiple of the tensor cores' 16."""
    return M <= MAX_M and K % 16 == 0 and N >= 16


def pick(M: int, N: int, K: int, split: bool) -> GemmConfig:
    """A config by shape: no autotuning, so nothing is compiled or timed at load."""
    bm = 16 if M <= 32 else 64
    bn = 32 if (not split and M <= 32) else 64
    bk = 64 if K % 64 == 0 else 32 if K % 32 == 0 else 16
    tiles = -(-M // bm) * -(-N // bn)
    s = 1
    if split:
        for cand in range(1, K // bk + 1):
            if K % (cand * bk) == 0 and tiles * cand <= TARGET_BLOCKS:
                s = cand
    return GemmConfig(bm, bn, bk, s)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GELU: tl.constexpr):
        # x (M, K) row-major, w (N, K) row-major (nn.Linear's layout): out = x @ w.T
        pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm, nm = rm < M, rn < N
        k0 = pid_s * K_SPLIT
        a_ptrs = x_ptr + rm[:, None] * K + (k0 + rk)[None, :]   # (BM, BK)
        b_ptrs = w_ptr + rn[None, :] * K + (k0 + rk)[:, None]   # (BK, BN): w.T's tile
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in tl.range(0, K_SPLIT, BK):
            a = tl.load(a_ptrs, mask=mm[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=nm[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK
        om = mm[:, None] & nm[None, :]
        if GELU:  # bias + exact (erf) GELU, stored in the output's dtype
            acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)
        else:     # this K slice's fp32 partial
            tl.store(out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=om)


def _launch(x, w, bias, out, cfg: GemmConfig, gelu: bool) -> None:
    M, K = x.shape
    N = w.shape[0]
    if not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("x and w must be contiguous (row stride K)")
    if K % (cfg.splits * cfg.bk):
        raise ValueError(f"K={K} is not a multiple of splits x bk = {cfg.splits} x {cfg.bk}")
    grid = (triton.cdiv(M, cfg.bm), triton.cdiv(N, cfg.bn), cfg.splits)
    _gemm_kernel[grid](x, w, bias, out, M, N, K, K // cfg.splits, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                       GELU=gelu, num_warps=cfg.warps, num_stages=cfg.stages)


def linear_partials(x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig | None = None) -> torch.Tensor:
    """x (M, K) @ w.T as fp32 split-K partials (S, M, N); sum over S is the product."""
    M, K = x.shape
    cfg = cfg or pick(M, w.shape[0], K, split=True)
    out = torch.empty(cfg.splits, M, w.shape[0], device=x.device, dtype=torch.float32)
    _launch(x, w, out, out, cfg, gelu=False)  # bias_ptr unused
    return out


def linear_gelu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, cfg: GemmConfig | None = None) -> torch.Tensor:
    """gelu(x @ w.T + bias), (M, N) in x's dtype."""
    M, K = x.shape
    cfg = cfg or pick(M, w.shape[0], K, split=False)
    if cfg.splits != 1:
        raise ValueError("the GELU epilogue needs the whole K in one block (splits=1)")
    out = torch.empty(M, w.shape[0], device=x.device, dtype=x.dtype)
    _launch(x, w, bias, out, cfg, gelu=True)
    return out

"""One-row matmuls of a batch-1 Llama decode step that also do the work around them, so a layer is 5 kernels:
RMSNorm + qkv, RoPE + cache + attention (decode_kernels), out projection + residual add, RMSNorm + gate/up +
SwiGLU, down projection + residual add. At batch 1 a step is bound by how many kernels it launches: the
9-kernel step of SmolLM2's 30 layers is about 270.

`gemv` computes y (N,) = W (N, K) . x' on the CUDA cores, fp32 sums, BN output rows a program:
- NORM: x' = RMSNorm(x) * w_norm. Every program takes the row's sum of squares itself (K <= a few
  thousand: one extra read of x from L1 / L2), so the norm needs no kernel of its own;
- GATEUP: W holds [gate | up] (2N, K); y = silu(gate . x') * (up . x');
- RESID: y is added to the residual stream r (N,) in place: r = r + y (each program owns its rows of r);
- OUT_F32: y written as fp32 (the logits), after rounding to the dtype as the torch head does.
Rounding follows the torch layers (RMSNorm's normalised row to the dtype before the weight, each matmul's
output, SiLU before the product, the residual sum), so the step gives the torch model's values.

Which BN / BK a shape gets is measured at load (`tune`, CUDA graphs of each candidate) per `tune_key`;
untuned shapes take DEFAULT.
"""
from __future__ import annotations

import torch

from millis.gpu.graph_timing import time_candidates

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, nw_ptr, w_ptr, b_ptr, r_ptr, y_ptr, K, N, eps, NORM: tl.constexpr,
                     GATEUP: tl.constexpr, RESID: tl.constexpr, HAS_B: tl.constexpr, OUT_F32: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        nm = rn < N
        dt = w_ptr.dtype.element_ty
        rstd = 1.0
        if NORM:  # pass 1: the row's mean square
            ss = tl.zeros((BK,), tl.float32)
            for k0 in range(0, K, BK):
                xk = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
                ss += xk * xk
            rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        acc = tl.zeros((BN,), tl.float32)
        acc2 = tl.zeros((BN,), tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            km = kk < K
            xf = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
            if NORM:  # RMSNorm as the torch layer: normalised row rounded to the dtype, then the weight
                n = (xf * rstd).to(dt).to(tl.float32)
                xf = (tl.load(nw_ptr + kk, mask=km, other=0.0).to(tl.float32) * n).to(dt).to(tl.float32)
            wm = nm[:, None] & km[None, :]
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=wm, other=0.0)
            acc += tl.sum(w.to(tl.float32) * xf[None, :], axis=1)
            if GATEUP:
                u = tl.load(w_ptr + (rn[:, None] + N) * K + kk[None, :], mask=wm, other=0.0)
                acc2 += tl.sum(u.to(tl.float32) * xf[None, :], axis=1)
        if HAS_B:
            acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        y = acc.to(dt).to(tl.float32)
        if GATEUP:  # SiLU rounded to the dtype before the product, as the torch layer
            a = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32)
            y = (a * acc2.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        if RESID:
            y = y + tl.load(r_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        if OUT_F32:
            tl.store(y_ptr + rn, y.to(dt).to(tl.float32), mask=nm)
        else:
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nm)


DEFAULT = {"BN": 8, "BK": 256, "num_warps": 4}
CANDIDATES = [{"BN": 4, "BK": 512, "num_warps": 4}, DEFAULT, {"BN": 16, "BK": 256, "num_warps": 4},
              {"BN": 16, "BK": 512, "num_warps": 8}]
TUNED: dict[tuple, dict] = {}  # tune_key -> the config `tune` measured fastest


def tune_key(n: int, k: int, norm: bool, gateup: bool) -> tuple:
    return n, k, norm, gateup


def gemv(x: torch.Tensor, w: torch.Tensor, norm_w: torch.Tensor | None = None, eps: float = 0.0,
         bias: torch.Tensor | None = None, gateup: bool = False, resid: torch.Tensor | None = None,
         out_f32: bool = False, config: dict | None = None) -> torch.Tensor:
    """x (K,) contiguous, w (N, K) or [gate | up] (2N, K) contiguous -> y (N,): in place into `resid` when given
    (and returned), else a new tensor in w's dtype (fp32 with out_f32). norm_w: RMSNorm x first."""
    K = x.shape[-1]
    N = w.shape[0] // 2 if gateup else w.shape[0]
    if resid is not None:
        y = resid
    else:
        y = torch.empty(N, device=x.device, dtype=torch.float32 if out_f32 else w.dtype)
    c = {**DEFAULT, **(TUNED.get(tune_key(N, K, norm_w is not None, gateup), {}) if config is None else config)}
    _gemv_kernel[(triton.cdiv(N, c["BN"]),)](
        x, norm_w if norm_w is not None else w, w, bias if bias is not None else w, y, y, K, N, eps,
        NORM=norm_w is not None, GATEUP=gateup, RESID=resid is not None, HAS_B=bias is not None, OUT_F32=out_f32,
        BN=c["BN"], BK=c["BK"], num_warps=c["num_warps"])
    return y


def tune(shapes: list[tuple[torch.Tensor, bool, bool]]) -> dict:
    """Measure the candidates on each distinct (N, K, norm, gateup) of `shapes` ((weight, norm, gateup), on
    CUDA), keep the fastest in TUNED and return {TUNED key: [(config, us), ...]}, fastest first
    (graph_timing.time_candidates)."""
    out = {}
    for w, norm, gateup in shapes:
        K = w.shape[1]
        N = w.shape[0] // 2 if gateup else w.shape[0]
        key = tune_key(N, K, norm, gateup)
        if key in TUNED:
            continue
        x = torch.randn(K, device=w.device, dtype=w.dtype)
        nw = torch.ones(K, device=w.device, dtype=w.dtype) if norm else None
        timed = time_candidates(CANDIDATES, lambda cand: gemv(x, w, nw, 1e-6, gateup=gateup, config=cand))
        if timed:
            out[key] = timed
            TUNED[key] = timed[0][0]
    return out

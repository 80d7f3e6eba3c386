"""Triton kernels of the GPU's weight-only formats (millis.gpu.weight_only): y (M, N) = x (M, K) @ W^T
with W packed, fp32 accumulation, written in x's dtype.

- `_channel_kernel` (int8 / fp8, a scale per row) and `_int4_kernel` (a scale and a minimum per 64
  inputs): tensor-core dots over BM x BN tiles (BM >= 16, tl.dot's smallest), for 1 to 64 rows;
- `_gemv_channel` / `_gemv_int4`: one row of x (a batch-1 decode step) on the CUDA cores, BN output rows
  a program: no 16-row padding, and small BN gives every SM several programs at a 2,048-wide output.

Which kernel and tile a shape gets is measured at load (`tune`, CUDA graphs of each candidate) and kept
per `tune_key` (format, N, K and one row or the tile's BM); untuned shapes take `block_sizes`' guess.
"""
from __future__ import annotations

import torch

from millis.gpu.graph_timing import time_candidates

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

GROUP = 64  # int4 inputs per scale / low: divides SmolLM2's 576 and every Llama width


if triton is not None:
    @triton.jit
    def _channel_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sxm, swn, sym,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        # int8 / fp8 weights (N, K), scale (N,): the tile converts to x's dtype (exact) before the dot
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * swn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w.to(tl.float32).to(x.dtype)), input_precision=PREC)  # via fp32: exact
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], (acc * s[None, :]).to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _int4_kernel(x_ptr, w_ptr, s_ptr, l_ptr, y_ptr, M, N, K, sxm, swn, sym,
                     BM: tl.constexpr, BN: tl.constexpr, GROUP_: tl.constexpr, PREC: tl.constexpr):
        # packed (N, Kp/2) uint8; scale, low (G, N): per group, two half-group dots (low / high nibbles),
        # then acc += dot * scale + sum(x) * low
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rh = tl.arange(0, GROUP_ // 2)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for g in range(0, tl.cdiv(K, GROUP_)):
            ka = g * GROUP_ + rh
            kb = ka + GROUP_ // 2
            xm = rm[:, None] < M
            xa = tl.load(x_ptr + rm[:, None] * sxm + ka[None, :], mask=xm & (ka[None, :] < K), other=0.0)
            xb = tl.load(x_ptr + rm[:, None] * sxm + kb[None, :], mask=xm & (kb[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rn[:, None] * swn + (g * (GROUP_ // 2) + rh)[None, :], mask=rn[:, None] < N, other=0)
            qa = (b & 15).to(tl.float32).to(xa.dtype)                      # (BN, GROUP/2), exact in bf16
            qb = (b >> 4).to(tl.float32).to(xa.dtype)
            part = tl.dot(xa, tl.trans(qa), input_precision=PREC) + \
                tl.dot(xb, tl.trans(qb), input_precision=PREC)             # (BM, BN) fp32
            xs = tl.sum(xa.to(tl.float32), axis=1) + tl.sum(xb.to(tl.float32), axis=1)  # (BM,)
            s = tl.load(s_ptr + g * N + rn, mask=rn < N, other=0.0)
            lo = tl.load(l_ptr + g * N + rn, mask=rn < N, other=0.0)
            acc += part * s[None, :] + xs[:, None] * lo[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _gemv_channel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, swn, BN: tl.constexpr, BK: tl.constexpr):
        # one row: y (N,) = (W (N, K) . x (K,)) * scale, products and sums in fp32 on the CUDA cores
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * swn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        tl.store(y_ptr + rn, (acc * s).to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _gemv_int4(x_ptr, w_ptr, s_ptr, l_ptr, y_ptr, N, K, swn, BN: tl.constexpr, GPS: tl.constexpr,
                   GROUP_: tl.constexpr):
        # one row, GPS groups a step: bytes (BN, GPS, GROUP/2); per group dot * scale + sum(x) * low
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rg = tl.arange(0, GPS)
        rh = tl.arange(0, GROUP_ // 2)
        n_groups = tl.cdiv(K, GROUP_)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for g0 in range(0, n_groups, GPS):
            g = g0 + rg                                                    # (GPS,)
            ka = g[:, None] * GROUP_ + rh[None, :]                         # (GPS, GROUP/2)
            xa = tl.load(x_ptr + ka, mask=ka < K, other=0.0).to(tl.float32)
            xb = tl.load(x_ptr + ka + GROUP_ // 2, mask=ka + GROUP_ // 2 < K, other=0.0).to(tl.float32)
            off = rn[:, None, None] * swn + (g[:, None] * (GROUP_ // 2) + rh[None, :])[None, :, :]
            b = tl.load(w_ptr + off, mask=(rn[:, None, None] < N) & (g[None, :, None] < n_groups), other=0)
            dots = tl.sum((b & 15).to(tl.float32) * xa[None, :, :], axis=2) + \
                tl.sum((b >> 4).to(tl.float32) * xb[None, :, :], axis=2)    # (BN, GPS)
            xs = tl.sum(xa, axis=1) + tl.sum(xb, axis=1)                    # (GPS,)
            sm = (rn[:, None] < N) & (g[None, :] < n_groups)
            s = tl.load(s_ptr + g[None, :] * N + rn[:, None], mask=sm, other=0.0)
            lo = tl.load(l_ptr + g[None, :] * N + rn[:, None], mask=sm, other=0.0)
            acc += tl.sum(dots * s + xs[None, :] * lo, axis=1)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


if triton is not None:
    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, l_ptr, w_ptr, N, K, sqn, INT4: tl.constexpr, GROUP_: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr):
        # the (N, K) weights in w's dtype, one pass over the packed ones, rounded as weight_only.dequantize in
        # that dtype: int8 / fp8 q * scale (the scale in the dtype first); int4 (q * scale) + low, q the
        # nibble of byte g * GROUP/2 + j % (GROUP/2) of input g * GROUP + j (low nibble for j < GROUP/2)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        m = (rn[:, None] < N) & (rk[None, :] < K)
        dt = w_ptr.dtype.element_ty
        if INT4:
            g = rk // GROUP_
            j = rk % GROUP_
            b = tl.load(q_ptr + rn[:, None] * sqn + (g * (GROUP_ // 2) + j % (GROUP_ // 2))[None, :], mask=m, other=0)
            v = ((b >> tl.where(j < GROUP_ // 2, 0, 4)[None, :].to(tl.uint8)) & 15).to(tl.float32)
            sg = tl.load(s_ptr + g[None, :] * N + rn[:, None], mask=m, other=0.0).to(dt).to(tl.float32)
            lo = tl.load(l_ptr + g[None, :] * N + rn[:, None], mask=m, other=0.0).to(dt).to(tl.float32)
            w = ((v * sg).to(dt).to(tl.float32) + lo).to(dt)
        else:
            v = tl.load(q_ptr + rn[:, None] * sqn + rk[None, :], mask=m, other=0.0).to(tl.float32)
            sc = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(dt).to(tl.float32)
            w = (v * sc[:, None]).to(dt)
        tl.store(w_ptr + rn[:, None] * K + rk[None, :], w, mask=m)


def kernel_dequantize(fmt: str, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, k: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """weight_only.dequantize's (N, k) weights in `dtype` from one Triton kernel (the prefill path: the torch
    ops take several passes and full-size temporaries; int4's over a dozen)."""
    N = q.shape[0]
    w = torch.empty(N, k, device=q.device, dtype=dtype)
    bn, bk = 16, 256
    _dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(k, bk))](
        q, scale, low if low is not None else scale, w, N, k, q.stride(0), INT4=fmt == "int4", GROUP_=GROUP,
        BN=bn, BK=bk, num_warps=4)
    return w


def block_sizes(M: int, N: int) -> tuple[int, int]:
    """(BM, BN): BM the rows rounded up to a power of two (>= 16, tl.dot's smallest); BN 16 while that
    still gives a program to every SM of a large GPU (~132) for a 2,048-wide output, else 32."""
    bm = max(16, 1 << (M - 1).bit_length())
    return bm, 16 if N <= 4096 else 32


TUNED: dict[tuple[str, int, int, int], dict] = {}  # tune_key -> the config `tune` measured fastest


def kernel_matmul(fmt: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None,
                  n: int, k: int, config: dict | None = None) -> torch.Tensor:
    """x (M, k) contiguous -> (M, n) in x's dtype, through a Triton kernel of `fmt`. `config`: {"gemv": True}
    (one row only) or the tile's BN, BK (int8 / fp8), GPS (int4 gemv), num_warps and num_stages; None = the
    tuned config of this shape, else `block_sizes`' guess."""
    M = x.shape[0]
    y = torch.empty(M, n, dtype=x.dtype, device=x.device)
    bm, bn = block_sizes(M, n)
    c = {"BN": bn, "BK": 256, "GPS": 4, "num_warps": 4, "num_stages": 4,
         **(TUNED.get(tune_key(fmt, n, k, M), {}) if config is None else config)}
    launch = {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}
    if c.get("gemv") and M == 1:
        grid = (triton.cdiv(n, c["BN"]),)
        if fmt == "int4":
            _gemv_int4[grid](x, q, scale, low, y, n, k, q.stride(0), BN=c["BN"], GPS=c["GPS"], GROUP_=GROUP, **launch)
        else:
            _gemv_channel[grid](x, q, scale, y, n, k, q.stride(0), BN=c["BN"], BK=c["BK"], **launch)
        return y
    bn = c["BN"] if not c.get("gemv") else bn  # a gemv config asked of several rows: the tile's guess
    grid = (triton.cdiv(n, bn), triton.cdiv(M, bm))
    launch["PREC"] = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 models' dots not in TF32 (bf16: moot)
    if fmt == "int4":
        _int4_kernel[grid](x, q, scale, low, y, M, n, k, x.stride(0), q.stride(0), y.stride(0), BM=bm, BN=bn,
                           GROUP_=GROUP, **launch)
    else:
        _channel_kernel[grid](x, q, scale, y, M, n, k, x.stride(0), q.stride(0), y.stride(0), BM=bm, BN=bn,
                              BK=c["BK"], **launch)
    return y


# candidates `tune` times: for one row the CUDA-core gemv at several widths and the 16-row tile; for more
# rows the tile at three widths and DEQUANT: the matrix dequantized into the activations' dtype, then cuBLAS
# (the first H200 run: int4's tile at 8 rows took 82 us for a 2048 x 8192 matmul that cuBLAS bf16 does in 11,
# where dequantizing costs about another 10)
GEMV_CANDIDATES = [{"gemv": True, "BN": bn, "BK": bk, "GPS": gps, "num_warps": w}
                   for bn, bk, gps, w in ((4, 512, 4, 2), (8, 512, 4, 4), (16, 256, 2, 4), (8, 1024, 8, 4))]
TILE_CANDIDATES = [{"BN": 16}, {"BN": 32}, {"BN": 64, "num_warps": 8}]
DEQUANT = {"dequant": True}  # run by WeightOnlyLinear.matmul, not by kernel_matmul


def tune_key(fmt: str, n: int, k: int, rows: int) -> tuple[str, int, int, int]:
    """TUNED's key: one row apart (the gemv may win there), else the tile's BM."""
    return fmt, n, k, 1 if rows == 1 else block_sizes(rows, n)[0]


def tune(layers, rows: tuple[int, ...] = (1, 16)) -> dict:
    """Measure the candidates on each distinct (format, N, K) of `layers` (WeightOnlyLinear, on CUDA) at each
    of `rows` through their `matmul`, keep the fastest in TUNED, and return {TUNED key: [(config, us), ...]}
    of what it measured, fastest first. Shapes already tuned are skipped; a candidate Triton refuses (shared
    memory, registers) is passed over. DEQUANT can be a row class's fastest (cuBLAS won) or all that ran there
    (no kernel built): weight_only.quantize_and_tune counts a shape as built only by a kernel's entry."""
    out = {}
    shapes = {(m.fmt, m.out_features, m.in_features): m for m in layers}
    for (fmt, n, k), m in shapes.items():
        for M in rows:
            key = tune_key(fmt, n, k, M)
            if key in TUNED:
                continue
            x = torch.randn(M, k, device=m.q.device, dtype=torch.bfloat16)
            timed = time_candidates(GEMV_CANDIDATES + TILE_CANDIDATES[:1] if M == 1 else TILE_CANDIDATES + [DEQUANT],
                                    lambda cand: m.matmul(x, cand))
            if timed:
                out[key] = timed
                TUNED[key] = timed[0][0]
    return out

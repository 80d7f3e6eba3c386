"""One-row matmuls of a batch-1 Llama decode step that also do the work around them, so a layer is 5 kernels:
RMSNorm + qkv, RoPE + cache + attention (decode_kernels), out projection + residual add, RMSNorm + gate/up +
SwiGLU, down projection + residual add. At batch 1 a step is bound by how many kernels it launches: the
9-kernel step of SmolLM2's 30 layers is about 270.

`gemv` computes y (N,) = W (N, K) . x' on the CUDA cores, fp32 sums, BN output rows a program, for plain
weights (an nn.Linear) and millis.gpu.weight_only's formats (int8 / fp8 with a scale per row, scaled after
the sums; int4 with a scale and a minimum per 64 inputs, GPS groups a step, as its one-row kernel):
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

from millis.gpu.decode_kernels import pdl_launch
from millis.gpu.graph_timing import time_candidates
from millis.gpu.weight_only_kernels import GROUP

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

if triton is not None:
    from millis.gpu.decode_kernels import gdc_enter

    @triton.jit
    def _xn(x_ptr, nw_ptr, k, km, rstd, NORM: tl.constexpr, CM: tl.constexpr):
        # x[k] in fp32, or RMSNorm(x)[k] * w_norm[k] as the torch layer rounds it (the normalised value to the
        # dtype, then the weight's product to the dtype). CM: the loads' cache modifier (".cg" where another
        # program of the same kernel wrote x: decode_layer)
        dt = x_ptr.dtype.element_ty
        xf = tl.load(x_ptr + k, mask=km, other=0.0, cache_modifier=CM).to(tl.float32)
        if NORM:
            n = (xf * rstd).to(dt).to(tl.float32)
            xf = (tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32) * n).to(dt).to(tl.float32)
        return xf

    @triton.jit
    def _int4_part(w_ptr, s_ptr, l_ptr, rows, nm, g, gm, rh, xa, xb, xs, swn, NT, GROUP: tl.constexpr):
        # rows (BN,) x GPS groups: packed bytes (BN, GPS, GROUP/2), low nibble = the group's first half;
        # per group dot * scale + sum(x) * low, summed over the groups -> (BN,)
        off = rows[:, None, None] * swn + (g[:, None] * (GROUP // 2) + rh[None, :])[None, :, :]
        b = tl.load(w_ptr + off, mask=nm[:, None, None] & gm[None, :, None], other=0)
        dots = tl.sum((b & 15).to(tl.float32) * xa[None, :, :], axis=2) + \
            tl.sum((b >> 4).to(tl.float32) * xb[None, :, :], axis=2)          # (BN, GPS)
        sm = nm[:, None] & gm[None, :]
        s = tl.load(s_ptr + g[None, :] * NT + rows[:, None], mask=sm, other=0.0)
        lo = tl.load(l_ptr + g[None, :] * NT + rows[:, None], mask=sm, other=0.0)
        return tl.sum(dots * s + xs[None, :] * lo, axis=1)

    @triton.jit
    def row_rstd(x_ptr, K, eps, BK: tl.constexpr, CM: tl.constexpr):
        # 1 / sqrt(mean(x^2) + eps) of the row x (K,), fp32
        rk = tl.arange(0, BK)
        ss = tl.zeros((BK,), tl.float32)
        for k0 in range(0, K, BK):
            xk = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0, cache_modifier=CM).to(tl.float32)
            ss += xk * xk
        return 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)

    @triton.jit
    def _chunk(w_ptr, rn, kk, m, N, swn, GATEUP: tl.constexpr):
        # weights (rn, kk) under mask m, and with GATEUP their up rows' (rn + N, kk); else the same tile twice
        w = tl.load(w_ptr + rn[:, None] * swn + kk[None, :], mask=m, other=0.0)
        u = w
        if GATEUP:
            u = tl.load(w_ptr + (rn[:, None] + N) * swn + kk[None, :], mask=m, other=0.0)
        return w, u

    @triton.jit
    def first_chunk(t, w_ptr, K, N, swn, GATEUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # tile t's weights over its first BK inputs (and its up rows' with GATEUP), loaded ahead of a PDL wait
        # or a grid barrier: weights are read-only, so nothing the wait guards; their latency then overlaps it
        rn = t * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        return _chunk(w_ptr, rn, rk, (rn[:, None] < N) & (rk[None, :] < K), N, swn, GATEUP)

    @triton.jit
    def gemv_tile(t, rstd, x_ptr, nw_ptr, w_ptr, s_ptr, l_ptr, b_ptr, r_ptr, y_ptr, K, N, NT, swn, w0, u0, pre,
                  FMT: tl.constexpr, NORM: tl.constexpr, GATEUP: tl.constexpr, RESID: tl.constexpr,
                  HAS_B: tl.constexpr, OUT_F32: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  GPS: tl.constexpr, GROUP: tl.constexpr, CM: tl.constexpr, PRE: tl.constexpr):
        # output rows [t * BN, (t + 1) * BN) of the one-row matmul (see the module's docstring); rstd: the
        # row's row_rstd when NORM. FMT 0: plain weights (N', K); 1: int8 / fp8 with a scale per row; 2: int4,
        # GROUP inputs per scale and minimum (millis.gpu.weight_only's layouts). NT = the weight's rows (2N
        # with GATEUP). PRE (not int4): where `pre` holds, w0 / u0 are this tile's first_chunk, loaded ahead.
        rn = t * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        nm = rn < N
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BN,), tl.float32)
        acc2 = tl.zeros((BN,), tl.float32)
        if FMT == 2:
            rg = tl.arange(0, GPS)
            rh = tl.arange(0, GROUP // 2)
            n_groups = tl.cdiv(K, GROUP)
            for g0 in range(0, n_groups, GPS):
                g = g0 + rg
                ka = g[:, None] * GROUP + rh[None, :]                         # (GPS, GROUP/2)
                xa = _xn(x_ptr, nw_ptr, ka, ka < K, rstd, NORM, CM)
                xb = _xn(x_ptr, nw_ptr, ka + GROUP // 2, ka + GROUP // 2 < K, rstd, NORM, CM)
                xs = tl.sum(xa, axis=1) + tl.sum(xb, axis=1)                 # (GPS,)
                gm = g < n_groups
                acc += _int4_part(w_ptr, s_ptr, l_ptr, rn, nm, g, gm, rh, xa, xb, xs, swn, NT, GROUP)
                if GATEUP:
                    acc2 += _int4_part(w_ptr, s_ptr, l_ptr, rn + N, nm, g, gm, rh, xa, xb, xs, swn, NT, GROUP)
        else:
            for k0 in range(0, K, BK):
                kk = k0 + rk
                km = kk < K
                xf = _xn(x_ptr, nw_ptr, kk, km, rstd, NORM, CM)
                wm = nm[:, None] & km[None, :]
                if PRE:
                    if pre & (k0 == 0):
                        w, u = w0, u0
                    else:
                        w, u = _chunk(w_ptr, rn, kk, wm, N, swn, GATEUP)
                else:
                    w, u = _chunk(w_ptr, rn, kk, wm, N, swn, GATEUP)
                acc += tl.sum(w.to(tl.float32) * xf[None, :], axis=1)
                if GATEUP:
                    acc2 += tl.sum(u.to(tl.float32) * xf[None, :], axis=1)
            if FMT == 1:
                acc = acc * tl.load(s_ptr + rn, mask=nm, other=0.0)
                if GATEUP:
                    acc2 = acc2 * tl.load(s_ptr + N + rn, mask=nm, other=0.0)
        if HAS_B:
            if FMT != 0:  # WeightOnlyLinear rounds its product to the dtype, then adds the bias (cuBLAS: one rounding)
                acc = acc.to(dt).to(tl.float32)
            acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        y = acc.to(dt).to(tl.float32)
        if GATEUP:  # SiLU rounded to the dtype before the product, as the torch layer
            a = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32)
            y = (a * acc2.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        if RESID:  # rows t * BN.. of r are this tile's alone: no other program reads or writes them meanwhile
            y = y + tl.load(r_ptr + rn, mask=nm, other=0.0, cache_modifier=CM).to(tl.float32)
        if OUT_F32:
            tl.store(y_ptr + rn, y.to(dt).to(tl.float32), mask=nm)
        else:
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nm)

    @triton.jit
    def _gemv_kernel(x_ptr, nw_ptr, w_ptr, s_ptr, l_ptr, b_ptr, r_ptr, y_ptr, K, N, NT, swn, eps,
                     FMT: tl.constexpr, NORM: tl.constexpr, GATEUP: tl.constexpr, RESID: tl.constexpr,
                     HAS_B: tl.constexpr, OUT_F32: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GPS: tl.constexpr, GROUP: tl.constexpr, GDC: tl.constexpr):
        t = tl.program_id(0)
        w0, u0 = 0.0, 0.0
        if FMT != 2:  # the weights' first chunk before the PDL wait: their load overlaps the kernel before
            w0, u0 = first_chunk(t, w_ptr, K, N, swn, GATEUP, BN, BK)
        gdc_enter(GDC)  # PDL (decode_kernels): the kernel before it done, the one after it may launch
        rstd = 1.0
        if NORM:  # every program takes the row's mean square itself: no norm kernel
            rstd = row_rstd(x_ptr, K, eps, BK, "")
        gemv_tile(t, rstd, x_ptr, nw_ptr, w_ptr, s_ptr, l_ptr, b_ptr, r_ptr, y_ptr, K, N, NT, swn, w0, u0, t >= 0,
                  FMT, NORM, GATEUP, RESID, HAS_B, OUT_F32, BN, BK, GPS, GROUP, "", FMT != 2)


FORMATS = {"plain": 0, "int8": 1, "fp8": 1, "int4": 2}  # nn.Linear, or millis.gpu.weight_only's formats
DEFAULT = {"BN": 8, "BK": 256, "GPS": 4, "num_warps": 4}
# the last two: more bytes in flight a program for the wide matrices, and half the K loop's dependent steps for
# int4 (GPS 16): the second H200 run's bf16 gemv kernels averaged 2.5 TB/s where cuBLAS reads the Llama-1B
# shape's gate/up matrix at 3.5, and int4's 2048 x 8192 matmul took 17.6 us (0.5 TB/s)
CANDIDATES = [{"BN": 4, "BK": 512, "GPS": 8, "num_warps": 4}, DEFAULT, {"BN": 16, "BK": 256, "GPS": 2, "num_warps": 4},
              {"BN": 16, "BK": 512, "GPS": 4, "num_warps": 8}, {"BN": 32, "BK": 256, "GPS": 4, "num_warps": 8},
              {"BN": 8, "BK": 1024, "GPS": 16, "num_warps": 8}]
TUNED: dict[tuple, dict] = {}  # tune_key -> the config `tune` measured fastest


def fmt_of(lin) -> str:
    """The weights' format: "plain" for an nn.Linear, else a WeightOnlyLinear's own."""
    return getattr(lin, "fmt", "plain")


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float16", "float32": a tuned config's key names its inputs' dtype (an fp32 engine opened after
    a bf16 one takes its own configs, not ones measured, and checked to fit, for bf16)."""
    return str(dtype).removeprefix("torch.")


def tune_key(fmt: str, dtype: torch.dtype, n: int, k: int, norm: bool, gateup: bool) -> tuple:
    return fmt, dtype_name(dtype), n, k, norm, gateup


def gemv(x: torch.Tensor, lin, norm_w: torch.Tensor | None = None, eps: float = 0.0, gateup: bool = False,
         resid: torch.Tensor | None = None, out_f32: bool = False, config: dict | None = None) -> torch.Tensor:
    """x (K,) contiguous in the model's dtype through `lin` (an nn.Linear, or a WeightOnlyLinear: int8, fp8,
    int4), its bias included; gateup: lin holds [gate | up] (2N rows). -> y (N,): in place into `resid`
    when given (and returned), else a new tensor in x's dtype (fp32 with out_f32). norm_w: RMSNorm x first."""
    fmt = fmt_of(lin)
    w = lin.weight if fmt == "plain" else lin.q
    K, NT = lin.in_features, lin.out_features
    N = NT // 2 if gateup else NT
    if resid is not None:
        y = resid
    else:
        y = torch.empty(N, device=x.device, dtype=torch.float32 if out_f32 else x.dtype)
    key = tune_key(fmt, x.dtype, N, K, norm_w is not None, gateup)
    c = {**DEFAULT, **(TUNED.get(key, {}) if config is None else config)}
    scale, low = getattr(lin, "scale", None), getattr(lin, "low", None)
    _gemv_kernel[(triton.cdiv(N, c["BN"]),)](
        x, norm_w if norm_w is not None else x, w, scale if scale is not None else x, low if low is not None else x,
        lin.bias if lin.bias is not None else x, y, y, K, N, NT, w.stride(0), eps, FMT=FORMATS[fmt],
        NORM=norm_w is not None, GATEUP=gateup, RESID=resid is not None, HAS_B=lin.bias is not None,
        OUT_F32=out_f32, BN=c["BN"], BK=c["BK"], GPS=c["GPS"], GROUP=GROUP, num_warps=c["num_warps"],
        **pdl_launch(x, True))
    return y


def ptx_of(kernel) -> list[str]:
    """The PTX of every compilation of a Triton kernel in this process (a GPU run checks that PDL's
    griddepcontrol instructions survived compilation); [] where there is none or this Triton keeps it
    elsewhere."""
    if triton is None:
        return []
    try:
        return [k.asm.get("ptx", "") for per_device in kernel.device_caches.values() for k in per_device[0].values()]
    except Exception:  # noqa: BLE001 -- Triton's cache layout is internal: a figure lost, not the run
        return []


def compiled_ptx() -> list[str]:
    """ptx_of the gemv kernel."""
    return ptx_of(_gemv_kernel) if triton is not None else []


def tune(shapes: list[tuple], dtype: torch.dtype) -> dict:
    """Measure the candidates on each distinct (format, N, K, norm, gateup) of `shapes` ((linear, norm, gateup),
    on CUDA) for inputs in the model's `dtype`, keep the fastest in TUNED (keyed with the dtype too) and return
    {TUNED key: [(config, us), ...]}, fastest first (graph_timing.time_candidates)."""
    out = {}
    for lin, norm, gateup in shapes:
        K, N = lin.in_features, lin.out_features // 2 if gateup else lin.out_features
        key = tune_key(fmt_of(lin), dtype, N, K, norm, gateup)
        if key in TUNED:
            continue
        dev = (lin.weight if fmt_of(lin) == "plain" else lin.q).device
        x = torch.randn(K, device=dev, dtype=dtype)
        nw = torch.ones(K, device=dev, dtype=dtype) if norm else None
        timed = time_candidates(CANDIDATES, lambda cand: gemv(x, lin, nw, 1e-6, gateup=gateup, config=cand))
        if timed:
            out[key] = timed
            TUNED[key] = timed[0][0]
    return out

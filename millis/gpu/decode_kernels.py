"""Fused Triton kernels of a Llama-family decode step (one new token per row), so a layer is 8 kernels:
add + RMSNorm, qkv, RoPE + KV-cache write + attention, out projection, add + RMSNorm, gate/up, SwiGLU, down
(5 at batch 1, where millis.gpu.decode_gemv's matmuls take the norms, the residual adds and SwiGLU).
The torch layers launch over 40 kernels a layer (RMSNorm alone 8: casts, pow, mean, rsqrt, muls), and at
batch 1 a step of small kernels is bound by how many it launches, not by bytes.

The elementwise kernels round where the torch layers round (RMSNorm's normalised row to the dtype before the
weight, RoPE's two products and their sum, SiLU before the product), so they give the torch model's values;
attention takes its softmax in fp32 (one pass, online) and both products as tensor-core dots, as the torch
path's fp32 softmax and bf16 matmuls, within rounding (an fp32 model's dots in IEEE fp32, not TF32).
Shapes: x (B, D) rows; qkv (B, (nh + 2 nkv) hs); the cache (slots, nkv, S, hs) with row b in slot b.
"""
from __future__ import annotations

import torch

from millis.common.config import env_switch

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

# Programmatic dependent launch (Hopper and newer) for the batch-1 step's chain of Triton kernels: each kernel
# waits for the one before it to finish (gdc_wait: its writes visible) and then lets the next one launch
# (gdc_launch_dependents), so a kernel's launch and scheduling overlap its predecessor's tail instead of
# following it; inside a CUDA graph the launch attribute becomes a programmatic edge. Every kernel of the chain
# waits before it reads, so a kernel never sees a predecessor's partial writes, transitively (a kernel ends only
# after its own wait). A torch kernel between them launches plainly and serializes as usual.
# MILLIS_NO_PDL=1 turns it off (the A/B switch); a Triton that cannot build it turns it off (`pdl_off`).
PDL = {"off": ""}  # why it is off in this process ("" : not turned off)


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL: CUDA, compute capability 9.0+, a Triton with gdc_wait."""
    if PDL["off"] or triton is None or not t.is_cuda or env_switch("MILLIS_NO_PDL"):
        return False
    return hasattr(tl.extra.cuda, "gdc_wait") and torch.cuda.get_device_capability(t.device)[0] >= 9


def pdl_off(reason: str) -> None:
    PDL["off"] = reason


if triton is not None:
    @triton.jit
    def gdc_enter(GDC: tl.constexpr):
        # the predecessor's writes visible, then the successor may launch (it waits in turn)
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, D, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr):
        # h = x + r (the residual stream, rounded to the dtype); y = w * (h * rsqrt(mean(h^2) + eps)) rounded
        # to the dtype before the weight's product, as millis.gen.models.llama.RMSNorm
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0)
        if HAS_R:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(h_ptr + row * D + cols, x, mask=m)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
        n = (xf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (w * n).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope(x1, x2, c1, c2, s1, s2):
        # x * cos + rotate_half(x) * sin on the two halves of a head, rotate_half(x) = (-x2, x1); each product
        # and the sum rounded to the dtype, as the torch layers (the tables cast to the dtype first)
        dt = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit
    def _rope_attention_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, o_ptr, NH, NKV, S, QKV_W, L,
                               window, scale, G: tl.constexpr, GP: tl.constexpr, HS: tl.constexpr,
                               BL: tl.constexpr, PREC: tl.constexpr, GDC: tl.constexpr):
        gdc_enter(GDC)
        rope_attention_head(tl.program_id(0), tl.program_id(1), qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr,
                            o_ptr, NH, NKV, S, QKV_W, L, window, scale, G, GP, HS, BL, PREC, "")

    @triton.jit
    def rope_attention_head(b, j, qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, o_ptr, NH, NKV, S, QKV_W, L,
                            window, scale, G: tl.constexpr, GP: tl.constexpr, HS: tl.constexpr,
                            BL: tl.constexpr, PREC: tl.constexpr, CM: tl.constexpr):
        # row b (a tensor), kv head j: RoPE on its G query heads (padded to GP >= 16 rows: tensor-core dots) and
        # its key; the key and value written at the row's position p of cache slot b; attention over the new
        # key (from registers) and the cached keys [lo, min(p, L)): key < p, and p - window < key with a
        # window. Online softmax in fp32, the probabilities in the dtype for the second dot (as the torch
        # step). Heads stay in halves (HS/2 wide) from RoPE to the output: no register shuffles.
        # CM: the cache modifier of qkv's loads (".cg" where another program of the same kernel wrote it)
        rg = tl.arange(0, GP)
        rh = tl.arange(0, HS // 2)
        rl = tl.arange(0, BL)
        gm = rg < G
        p = tl.load(pos_ptr + b)
        row = qkv_ptr + b * QKV_W
        qb = row + (j * G + rg[:, None]) * HS
        q1 = tl.load(qb + rh[None, :], mask=gm[:, None], other=0.0, cache_modifier=CM)          # (GP, HS/2)
        q2 = tl.load(qb + HS // 2 + rh[None, :], mask=gm[:, None], other=0.0, cache_modifier=CM)
        dt = q1.dtype
        c1 = tl.load(cos_ptr + p * HS + rh).to(dt).to(tl.float32)
        c2 = tl.load(cos_ptr + p * HS + HS // 2 + rh).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + p * HS + rh).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + p * HS + HS // 2 + rh).to(dt).to(tl.float32)
        q1, q2 = _rope(q1, q2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
        k1, k2 = _rope(tl.load(row + (NH + j) * HS + rh, cache_modifier=CM),
                       tl.load(row + (NH + j) * HS + HS // 2 + rh, cache_modifier=CM),
                       c1, c2, s1, s2)                                       # (HS/2,) each
        v1 = tl.load(row + (NH + NKV + j) * HS + rh, cache_modifier=CM)
        v2 = tl.load(row + (NH + NKV + j) * HS + HS // 2 + rh, cache_modifier=CM)
        kv = (b.to(tl.int64) * NKV + j) * S * HS  # int64: one layer's cache may pass 2**31 elements
        dst = kv + p * HS
        tl.store(k_ptr + dst + rh, k1)
        tl.store(k_ptr + dst + HS // 2 + rh, k2)
        tl.store(v_ptr + dst + rh, v1)
        tl.store(v_ptr + dst + HS // 2 + rh, v2)
        # the new key first: its probability is exp(0) = 1, so the sums start at (1, v)
        m_i = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
               + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * scale   # (GP,)
        l_i = tl.full((GP,), 1.0, tl.float32)
        a1 = tl.zeros((GP, HS // 2), tl.float32) + v1.to(tl.float32)[None, :]
        a2 = tl.zeros((GP, HS // 2), tl.float32) + v2.to(tl.float32)[None, :]
        hi = tl.minimum(p, L).to(tl.int32)
        lo = tl.where(window > 0, tl.maximum(p - window + 1, 0) // BL * BL, 0).to(tl.int32)
        for l0 in range(lo, hi, BL):
            key = l0 + rl                                                    # (BL,)
            seen = key < hi
            if window > 0:
                seen = seen & (key > p - window)
            km = seen[:, None]
            kp = k_ptr + kv + key[:, None] * HS + rh[None, :]
            s = tl.dot(q1, tl.trans(tl.load(kp, mask=km, other=0.0)), input_precision=PREC) + \
                tl.dot(q2, tl.trans(tl.load(kp + HS // 2, mask=km, other=0.0)), input_precision=PREC)  # (GP, BL) fp32
            s = tl.where(seen[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))                       # finite: m_i starts finite
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            vp = v_ptr + kv + key[:, None] * HS + rh[None, :]
            pd = pr.to(dt)
            a1 = a1 * alpha[:, None] + tl.dot(pd, tl.load(vp, mask=km, other=0.0), input_precision=PREC)
            a2 = a2 * alpha[:, None] + tl.dot(pd, tl.load(vp + HS // 2, mask=km, other=0.0), input_precision=PREC)
            m_i = m_new
        ob = o_ptr + (b * NH + j * G + rg[:, None]) * HS
        tl.store(ob + rh[None, :], (a1 / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
        tl.store(ob + HS // 2 + rh[None, :], (a2 / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])

    @triton.jit
    def _swiglu_kernel(g_ptr, y_ptr, H, BLOCK: tl.constexpr):
        # g (B, 2H) = [gate | up] -> y (B, H) = silu(gate) * up, SiLU rounded to the dtype first (as torch)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < H
        gate = tl.load(g_ptr + row * 2 * H + cols, mask=m, other=0.0)
        up = tl.load(g_ptr + row * 2 * H + H + cols, mask=m, other=0.0).to(tl.float32)
        gf = gate.to(tl.float32)
        a = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (a * up).to(y_ptr.dtype.element_ty), mask=m)


def pdl_launch(t: torch.Tensor, chained: bool) -> dict:
    """A chained kernel's launch arguments: GDC (its constexpr) and launch_pdl, on when `chained` (the batch-1
    step: every kernel around it waits too) and PDL is on for t's device."""
    on = chained and pdl(t)
    return {"GDC": on, "launch_pdl": True} if on else {"GDC": False}


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float):
    """(x + r, RMSNorm(x + r) * w) for x, r (B, D) contiguous; r None: (x, RMSNorm(x) * w)."""
    B, D = x.shape
    h = torch.empty_like(x) if r is not None else x
    y = torch.empty_like(x)
    block = triton.next_power_of_2(D)
    _add_rmsnorm_kernel[(B,)](x, r if r is not None else x, w, h, y, D, eps, HAS_R=r is not None, BLOCK=block,
                              num_warps=4 if block <= 1024 else 8)
    return h, y


def rope_attention(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, nh: int, nkv: int, kv_len: int,
                   window: int, chained: bool = False) -> torch.Tensor:
    """qkv (B, (nh + 2 nkv) hs), pos (B,) -> attention output (B, nh * hs) in qkv's dtype; the rotated keys and
    the values written into rows 0..B-1 of the caches (slots, nkv, S, hs) at each row's position, every row
    attending its new key and its cached keys below `kv_len` (the graph bucket's bound). cos, sin: the model's
    RoPE tables (max_seq, hs). An idle bucket row (the scratch position) attends like any other: its own
    key keeps its softmax finite. chained: between PDL kernels (the batch-1 step of decode_gemv's matmuls)."""
    B = qkv.shape[0]
    hs, S = k_cache.shape[-1], k_cache.shape[2]
    g = nh // nkv
    o = torch.empty(B, nh * hs, device=qkv.device, dtype=qkv.dtype)
    _rope_attention_kernel[(B, nkv)](qkv, pos, cos, sin, k_cache, v_cache, o, nh, nkv, S, qkv.shape[1], kv_len,
                                     window, hs ** -0.5, G=g, GP=max(16, triton.next_power_of_2(g)), HS=hs, BL=64,
                                     # an fp32 model's dots in fp32, not Triton's default TF32 (10-bit mantissa:
                                     # HF fp32 and the torch step compute in full fp32); 16-bit inputs ignore it
                                     PREC="ieee" if qkv.dtype == torch.float32 else "tf32",
                                     num_warps=4, num_stages=3, **pdl_launch(qkv, chained))
    return o


def swiglu(g: torch.Tensor) -> torch.Tensor:
    """g (B, 2H) -> silu(g[:, :H]) * g[:, H:] (B, H)."""
    B, H2 = g.shape
    y = torch.empty(B, H2 // 2, device=g.device, dtype=g.dtype)
    block = 1024
    _swiglu_kernel[(B, triton.cdiv(H2 // 2, block))](g, y, H2 // 2, BLOCK=block, num_warps=4)
    return y

"""Fused Triton kernels of a Llama-family decode step (one new token per row), so a layer is 9 kernels:
add + RMSNorm, qkv, RoPE + KV-cache write, attention, out projection, add + RMSNorm, gate/up, SwiGLU, down.
The torch layers launch over 40 kernels a layer (RMSNorm alone 8: casts, pow, mean, rsqrt, muls), and at
batch 1 a step of small kernels is bound by how many it launches, not by bytes.

The elementwise kernels round where the torch layers round (RMSNorm's normalised row to the dtype before the
weight, RoPE's two products and their sum, SiLU before the product), so they give the torch model's values;
attention takes its softmax in fp32 (one pass, online) and both products as tensor-core dots, as the torch
path's fp32 softmax and bf16 matmuls, within rounding.
Shapes: x (B, D) rows; qkv (B, (nh + 2 nkv) hs); the cache (slots, nkv, S, hs) with row b in slot b.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

if triton is not None:
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
    def _rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, NH, NKV, S, QKV_W,
                           HS: tl.constexpr):
        # program (row b, head h): h < NH rotates query head h into q (B, NH, HS); else kv head j = h - NH:
        # rotates key j and writes it, and value j, at the row's position of its cache slot (slot b)
        b = tl.program_id(0)
        h = tl.program_id(1)
        half = tl.arange(0, HS // 2)
        p = tl.load(pos_ptr + b)
        base = qkv_ptr + b * QKV_W + h * HS
        x1 = tl.load(base + half)
        x2 = tl.load(base + HS // 2 + half)
        dt = x1.dtype
        c1 = tl.load(cos_ptr + p * HS + half).to(dt).to(tl.float32)          # the table cast to the dtype, as torch
        c2 = tl.load(cos_ptr + p * HS + HS // 2 + half).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + p * HS + half).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + p * HS + HS // 2 + half).to(dt).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product and the sum rounded
        o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        if h < NH:
            out = q_ptr + (b * NH + h) * HS
            tl.store(out + half, o1)
            tl.store(out + HS // 2 + half, o2)
        else:
            j = h - NH
            dst = ((b * NKV + j) * S + p) * HS
            tl.store(k_ptr + dst + half, o1)
            tl.store(k_ptr + dst + HS // 2 + half, o2)
            vsrc = qkv_ptr + b * QKV_W + (NH + NKV + j) * HS
            tl.store(v_ptr + dst + half, tl.load(vsrc + half))
            tl.store(v_ptr + dst + HS // 2 + half, tl.load(vsrc + HS // 2 + half))

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, NH, NKV, S, L, window, scratch, scale,
                          G: tl.constexpr, GP: tl.constexpr, HS: tl.constexpr, BL: tl.constexpr):
        # program (row b, kv head j): its G query heads, padded to GP >= 16 rows so both products are
        # tensor-core dots (and the K / V loads pipeline), over keys [0, L) of slot b; online softmax in fp32,
        # the probabilities in the dtype for the second dot (as the torch step). Visible: key <= pos (and
        # pos - window < key with a window); the idle rows of a graph bucket (pos == scratch) see every key
        b = tl.program_id(0)
        j = tl.program_id(1)
        rg = tl.arange(0, GP)
        rd = tl.arange(0, HS)
        rl = tl.arange(0, BL)
        gm = rg < G
        q = tl.load(q_ptr + (b * NH + j * G + rg[:, None]) * HS + rd[None, :], mask=gm[:, None], other=0.0)
        p = tl.load(pos_ptr + b)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, HS), tl.float32)
        kv = (b.to(tl.int64) * NKV + j) * S * HS  # int64: one layer's cache may pass 2**31 elements
        for l0 in range(0, L, BL):
            key = l0 + rl                                                    # (BL,)
            seen = (key < L) & ((key <= p) | (p == scratch))
            if window > 0:
                seen = seen & ((key > p - window) | (p == scratch))
            k = tl.load(k_ptr + kv + key[:, None] * HS + rd[None, :], mask=(key < L)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale                               # (GP, BL) fp32
            s = tl.where(seen[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block all masked so far (a window): no NaN
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            v = tl.load(v_ptr + kv + key[:, None] * HS + rd[None, :], mask=(key < L)[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padded query rows see nothing: 0, not NaN
        tl.store(o_ptr + (b * NH + j * G + rg[:, None]) * HS + rd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gm[:, None])

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


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float):
    """(x + r, RMSNorm(x + r) * w) for x, r (B, D) contiguous; r None: (x, RMSNorm(x) * w)."""
    B, D = x.shape
    h = torch.empty_like(x) if r is not None else x
    y = torch.empty_like(x)
    block = triton.next_power_of_2(D)
    _add_rmsnorm_kernel[(B,)](x, r if r is not None else x, w, h, y, D, eps, HAS_R=r is not None, BLOCK=block,
                              num_warps=4 if block <= 1024 else 8)
    return h, y


def rope_cache(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, nh: int, nkv: int) -> torch.Tensor:
    """qkv (B, (nh + 2 nkv) hs), pos (B,) -> rotated queries (B, nh, hs); rotated keys and the values written
    into rows 0..B-1 of the caches (slots, nkv, S, hs) at each row's position. cos, sin: the model's RoPE
    tables (max_seq, hs), fp32 or its dtype (cast to the dtype here, as the torch layers do)."""
    B = qkv.shape[0]
    hs, S = k_cache.shape[-1], k_cache.shape[2]
    q = torch.empty(B, nh, hs, device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(B, nh + nkv)](qkv, pos, cos, sin, q, k_cache, v_cache, nh, nkv, S, qkv.shape[1], HS=hs,
                                      num_warps=1)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, kv_len: int,
                     window: int, scratch: int) -> torch.Tensor:
    """q (B, nh, hs) against keys [0, kv_len) of cache rows 0..B-1 -> (B, nh * hs) in q's dtype."""
    B, nh, hs = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    g = nh // nkv
    o = torch.empty(B, nh * hs, device=q.device, dtype=q.dtype)
    _attention_kernel[(B, nkv)](q, k_cache, v_cache, pos, o, nh, nkv, S, kv_len, window, scratch, hs ** -0.5,
                                G=g, GP=max(16, triton.next_power_of_2(g)), HS=hs, BL=64, num_warps=4, num_stages=3)
    return o


def swiglu(g: torch.Tensor) -> torch.Tensor:
    """g (B, 2H) -> silu(g[:, :H]) * g[:, H:] (B, H)."""
    B, H2 = g.shape
    y = torch.empty(B, H2 // 2, device=g.device, dtype=g.dtype)
    block = 1024
    _swiglu_kernel[(B, triton.cdiv(H2 // 2, block))](g, y, H2 // 2, BLOCK=block, num_warps=4)
    return y

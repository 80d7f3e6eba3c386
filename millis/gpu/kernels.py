"""Fused epilogues for the encoder: embeddings + LayerNorm, bias + residual + LayerNorm, bias + GELU.

Each has a Triton kernel (CUDA tensors, `fuse="triton"`) and a plain torch version (`fuse="torch"`):
the reference and the CPU path. Statistics are computed in fp32 whatever the storage dtype. One Triton
program per token row: a row (384 or 768 values) fits in one block, so each row is read once and written
once. `add_ln` also sums split-K partials (S, M, H): only bench/gpu_research's Triton GEMMs produce them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None


def triton_ok(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


# ---- torch versions (reference, CPU) ----

def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (B, T) 0/1 -> (B, 1, 1, T) additive: padding keys get the dtype's most negative value, so exp()
    # is exactly 0, and a row that is all padding (a batch pad row) stays finite instead of NaN
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def embed_ln_torch(ids, types, mask, word, pos, typ, w, b, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # ids, types, mask (B, T) int64 -> x (B*T, H), attention bias (B, 1, 1, T);
    # positions are 0..T-1 (BERT's absolute positions)
    T = ids.shape[1]
    x = word[ids] + pos[:T].unsqueeze(0) + typ[types]
    x = F.layer_norm(x, (x.shape[-1],), w, b, eps).reshape(-1, x.shape[-1])
    return x, mask_bias(mask, word.dtype)


def add_ln_torch(h, bias, res, w, b, eps: float) -> torch.Tensor:
    # LayerNorm(h + bias + res); res (M, H); h (M, H), or (S, M, H) split-K partials to sum
    if h.dim() == 3:
        h = h.sum(0)
    return F.layer_norm((h + bias + res).to(res.dtype), (h.shape[-1],), w, b, eps)


def bias_gelu_torch(h, bias) -> torch.Tensor:
    return F.gelu(h + bias)  # exact (erf) GELU, as BERT's "gelu"


# ---- Triton kernels ----

if triton is not None:
    @triton.jit
    def _layer_norm_row(x, m, cols, w_ptr, b_ptr, N, eps):
        # x (BLOCK,) fp32, m masks its N real columns -> LayerNorm(x) * w + b, fp32
        mean = tl.sum(x, axis=0) / N
        d = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        return d * rstd * tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32) \
            + tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _embed_ln_kernel(ids_ptr, types_ptr, mask_ptr, word_ptr, pos_ptr, typ_ptr, w_ptr, b_ptr, out_ptr,
                         bias_ptr, T, N, eps, neg, BLOCK: tl.constexpr):
        row = tl.program_id(0)                  # token index in the flattened (B*T) batch
        cols = tl.arange(0, BLOCK)
        m = cols < N
        # this token's attention bias (mask_bias), so the mask costs no launches of its own
        keep = tl.load(mask_ptr + row).to(tl.float32)
        tl.store(bias_ptr + row, ((1.0 - keep) * neg).to(bias_ptr.dtype.element_ty))
        tok = tl.load(ids_ptr + row)
        typ = tl.load(types_ptr + row)
        p = row % T
        x = tl.load(word_ptr + tok * N + cols, mask=m, other=0.0).to(tl.float32)
        x += tl.load(pos_ptr + p * N + cols, mask=m, other=0.0).to(tl.float32)
        x += tl.load(typ_ptr + typ * N + cols, mask=m, other=0.0).to(tl.float32)
        y = _layer_norm_row(x, m, cols, w_ptr, b_ptr, N, eps)
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_ln_kernel(h_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, out_ptr, N, eps, S, MN, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(S):  # h holds S split-K partials of the GEMM (S = 1: the product itself)
            x += tl.load(h_ptr + s * MN + row * N + cols, mask=m, other=0.0).to(tl.float32)
        x += tl.load(bias_ptr + cols, mask=m, other=0.0).to(tl.float32)
        x += tl.load(res_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        y = _layer_norm_row(x, m, cols, w_ptr, b_ptr, N, eps)
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_gelu_kernel(h_ptr, bias_ptr, out_ptr, total, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        x = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x += tl.load(bias_ptr + offs % N, mask=m, other=0.0).to(tl.float32)
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _row_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def _dense(*ts):
    """The kernels index rows as ptr + row * N: a strided view (a slice, a transpose) becomes a copy."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in ts)


def embed_ln(ids, types, mask, word, pos, typ, w, b, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not triton_ok(word):
        return embed_ln_torch(ids, types, mask, word, pos, typ, w, b, eps)
    ids, types, mask, word, pos, typ, w, b = _dense(ids, types, mask, word, pos, typ, w, b)
    B, T = ids.shape
    N = word.shape[1]
    out = torch.empty(B * T, N, device=word.device, dtype=word.dtype)
    bias = torch.empty(B, 1, 1, T, device=word.device, dtype=word.dtype)
    block = triton.next_power_of_2(N)
    _embed_ln_kernel[(B * T,)](ids, types, mask, word, pos, typ, w, b, out, bias, T, N, eps,
                               torch.finfo(word.dtype).min, BLOCK=block, num_warps=_row_warps(block))
    return out, bias


def add_ln(h, bias, res, w, b, eps: float) -> torch.Tensor:
    """LayerNorm(h + bias + res) -> (M, H) in res's dtype; h (M, H) or (S, M, H) fp32 partials."""
    if not triton_ok(h):
        return add_ln_torch(h, bias, res, w, b, eps)
    h, bias, res, w, b = _dense(h, bias, res, w, b)
    M, N = res.shape
    S = h.shape[0] if h.dim() == 3 else 1
    out = torch.empty_like(res)
    block = triton.next_power_of_2(N)
    _add_ln_kernel[(M,)](h, bias, res, w, b, out, N, eps, S, M * N, BLOCK=block, num_warps=_row_warps(block))
    return out


def bias_gelu(h, bias) -> torch.Tensor:
    if not triton_ok(h):
        return bias_gelu_torch(h, bias)
    if not h.is_contiguous():  # in place below: a strided h is made dense first (and that copy returned)
        h = h.contiguous()
    bias, = _dense(bias)
    total, N = h.numel(), h.shape[-1]
    block = 1024
    _bias_gelu_kernel[(triton.cdiv(total, block),)](h, bias, h, total, N, BLOCK=block, num_warps=4)
    return h  # in place: the GEMM output is not needed afterwards

"""ModernBERT's forward on the compact encoder's weights (millis.encoder.modernbert's roles), in torch: the CPU
reference the native kernels and the smoothing calibration read, and the CUDA encoder's path for this family
(plain torch ops: no Triton epilogues yet).

State per layer: x, the residual stream, and h, the LayerNorm'd rows its qkv reads (layer 0: the embeddings'
LayerNorm, which is x itself). A layer: a = attention(h Wqkv) with q, k rotated; x += a Wo + bo; m = LN1(x);
x += (gelu(m Wv + bv) * (m Wg + bg)) Wd + bd; h = LN2(x), LN2 being the next layer's attn_norm or, after the last
layer, the final norm: h is then the last hidden states.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from millis.encoder.modernbert import WINDOW_BIAS, rope_table
from millis.gpu.kernels import mask_bias
from millis.gpu.w8a8_kernels import linear


def tables(cfg, device: torch.device) -> dict[float, torch.Tensor]:
    """Rotary tables (max_positions, hd) fp32 by base: the global layers' and the sliding-window layers'."""
    hd = cfg.hidden // cfg.heads
    return {t: torch.from_numpy(rope_table(t, hd, cfg.max_positions)).to(device)
            for t in {cfg.rope_theta, cfg.rope_local_theta}}


def rotated(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd) at positions 0..T-1: x cos + rotate_half(x) sin, in fp32 as HF computes it."""
    T, half = x.shape[2], x.shape[3] // 2
    cos, sin = table[:T, :half], table[:T, half:]
    a, b = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).to(x.dtype)


def window_mask(T: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T) additive: 0 where |q - k| <= window, else a large negative (HF's sliding-window mask)."""
    i = torch.arange(T, device=device)
    far = (i[:, None] - i[None, :]).abs() > window
    return torch.zeros((T, T), dtype=dtype, device=device).masked_fill(far, max(WINDOW_BIAS, torch.finfo(dtype).min))


def layer(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor, lw, B: int, T: int,
          heads: int, eps: float, fused: bool, see: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-LayerNorm layer: (x, h) (B*T, H) each -> (x, h) after it; bias (B or 1, 1 or nh, T, T) or None."""
    H = x.shape[1]
    see(lw, "qkv", h)
    qkv = linear(h, lw.wqkv, lw.bqkv, kernel=fused)                       # (B*T, 3H)
    q, k, v = qkv.view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
    a = F.scaled_dot_product_attention(rotated(q, table), rotated(k, table), v, attn_mask=bias)
    a = a.transpose(1, 2).reshape(-1, H)
    see(lw, "o", a)
    x = x + linear(a, lw.wo, lw.bo, kernel=fused)
    m = F.layer_norm(x, (H,), lw.ln1w, lw.ln1b, eps)
    see(lw, "inter", m)
    value, gate = linear(m, lw.w1, lw.b1, kernel=fused).chunk(2, dim=-1)  # the GLU's halves (I each)
    f = F.gelu(value) * gate
    see(lw, "down", f)
    x = x + linear(f, lw.w2, lw.b2, kernel=fused)
    return x, F.layer_norm(x, (H,), lw.ln2w, lw.ln2b, eps)


def forward(enc, input_ids: torch.Tensor, attention_mask: torch.Tensor, dense: bool,
            observe: Callable | None = None) -> torch.Tensor:
    """The last hidden states (B, T, H) of millis.gpu.encoder.Encoder `enc` for a ModernBERT; observe as
    layer_forward's."""
    cfg, see = enc.cfg, observe or (lambda *a: None)
    B, T = input_ids.shape
    x = F.layer_norm(enc.word[input_ids], (cfg.hidden,), enc.emb_lnw, enc.emb_lnb, cfg.eps).reshape(B * T, -1)
    pad = None if dense else mask_bias(attention_mask, x.dtype)           # (B, 1, 1, T)
    local = window_mask(T, cfg.window, x.dtype, x.device) if T > cfg.window + 1 else None
    h = x
    for i, lw in enumerate(enc.layers):
        slides = i in cfg.local_layers
        bias = pad if not (slides and local is not None) else local if pad is None else \
            (local + pad).clamp(min=torch.finfo(x.dtype).min)  # (fp16: two minima would sum to -inf, NaN rows)
        table = enc.rope[cfg.rope_local_theta if slides else cfg.rope_theta]
        x, h = layer(x, h, bias, table, lw, B, T, cfg.heads, cfg.eps, enc.fused, see)
    return h.view(B, T, -1)

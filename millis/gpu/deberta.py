"""DeBERTa-v2 / v3's forward on the compact encoder's weights (millis.encoder.deberta), in torch: the CPU reference
the native kernels and the smoothing calibration read, and the CUDA encoder's path for this family. BERT's layers
(millis.gpu.encoder.after_attention); the attention adds each layer's disentangled bias, gathered from two small
products per head, through SDPA's additive mask (no fused kernel for it yet).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from millis.encoder import deberta
from millis.gpu.kernels import mask_bias
from millis.gpu.w8a8_kernels import linear


class Tables:
    """Per layer (pq, pk), each (nh, rows, hd) in the encoder's dtype (deberta.position_tables of rel, the relative
    embeddings (rel_emb, rel_lnw, rel_lnb), and qk, each layer's fp32 (wqkv, bqkv) before any quantization), and the
    rows of every (query, key) pair: at[i, j] (P, P) int64 for P positions."""

    def __init__(self, c, rel: tuple, qk: list, device: torch.device, dtype: torch.dtype):
        rel = deberta.relative_embeddings(*rel, c)
        self.layers = []
        for w, b in qk:
            pq, pk = deberta.position_tables(rel, w, b, c)
            self.layers.append(tuple(torch.from_numpy(t).to(device=device, dtype=dtype) for t in (pq, pk)))
        rows = deberta.table_rows(c, c.max_positions)  # entry P - 1 + (i - j)
        i = np.arange(c.max_positions)
        self.at = torch.from_numpy(rows[c.max_positions - 1 + i[:, None] - i[None, :]].astype(np.int64)).to(device)
        self.scale = deberta.scale(c)


def disentangled_bias(q: torch.Tensor, k: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, at: torch.Tensor,
                      terms: tuple[str, ...]) -> torch.Tensor | None:
    """q, k (B, nh, T, hd); pq, pk (nh, rows, hd); at (T, T) -> (B, nh, T, T): c2p q_i . pk[at[i, j]] plus p2c
    k_j . pq[at[i, j]] (HF's gathers, in the same layout); None without either term."""
    B, nh, T, _ = q.shape
    parts = []
    if "c2p" in terms:
        parts.append(torch.gather(q @ pk.transpose(-1, -2), -1, at.expand(B, nh, T, T)))
    if "p2c" in terms:  # row j of k pq^T, read at at[i, j]: gathered as [j, i], then transposed
        parts.append(torch.gather(k @ pq.transpose(-1, -2), -1, at.T.expand(B, nh, T, T)).transpose(-1, -2))
    return sum(parts[1:], parts[0]) if parts else None


def forward(enc, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor, dense: bool,
            after_attention: Callable, observe: Callable | None = None) -> torch.Tensor:
    """The last hidden states (B, T, H) of millis.gpu.encoder.Encoder `enc` for a DeBERTa; after_attention: that
    module's (BERT's layer from its attention rows on; passed in, as that module imports this one); observe as
    layer_forward's (each GEMM's input: millis.encoder.smooth)."""
    cfg, see, tables = enc.cfg, observe or (lambda *a: None), enc.dis
    B, T = input_ids.shape
    H, nh = cfg.hidden, cfg.heads
    x = enc.word[input_ids] + enc.typ[token_type_ids]
    if enc.pos is not None:  # position_biased_input
        x = x + enc.pos[:T].unsqueeze(0)
    x = F.layer_norm(x, (H,), enc.emb_lnw, enc.emb_lnb, cfg.eps).reshape(B * T, H)
    pad = None if dense else mask_bias(attention_mask, x.dtype)           # (B, 1, 1, T)
    at = tables.at[:T, :T]
    for lw, (pq, pk) in zip(enc.layers, tables.layers):
        see(lw, "qkv", x)
        qkv = linear(x, lw.wqkv, lw.bqkv, kernel=enc.fused)                 # (B*T, 3H)
        q, k, v = qkv.view(B, T, 3, nh, H // nh).permute(2, 0, 3, 1, 4)    # each (B, nh, T, hd)
        bias = disentangled_bias(q, k, pq, pk, at, cfg.dis_terms)
        if pad is not None:  # (fp16: the padding's minimum plus a negative bias would be -inf: clamped)
            bias = pad if bias is None else (bias + pad).clamp(min=torch.finfo(x.dtype).min)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=tables.scale)
        x = after_attention(a.transpose(1, 2).reshape(-1, H), x, lw, cfg.eps, enc.fused, see)
    return x.view(B, T, H)

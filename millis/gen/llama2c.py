"""llama2.c checkpoints (legacy v0 format): recognise one by its size, read it into HF-layout weights."""
from __future__ import annotations

import struct
from pathlib import Path

import torch

from millis.common.errors import MillisError
from millis.gen.config import LlamaConfig


def _llama2c_count(dim, hidden, L, nh, nkv, vocab, seq) -> int:
    kv_dim = dim * nkv // nh
    return (abs(vocab) * dim + 2 * L * dim + 2 * L * dim * dim + 2 * L * dim * kv_dim + 3 * L * dim * hidden
            + dim + seq * (dim // nh) + (abs(vocab) * dim if vocab < 0 else 0))


def _llama2c_header(path: Path):
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) < 28:
        return None
    h = struct.unpack("<7i", head)
    dim, hidden, L, nh, nkv, vocab, seq = h
    if min(dim, hidden, L, nh, nkv, seq) < 1 or vocab == 0 or dim % nh or nh % nkv:
        return None
    return h


def is_llama2c_checkpoint(path: Path) -> bool:
    """A legacy v0 llama2.c file: its size is exactly the header plus the float32 count it implies."""
    h = _llama2c_header(path)
    return h is not None and path.stat().st_size == 28 + 4 * _llama2c_count(*h)


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c rotates interleaved pairs; HF rotates halves: reorder each head's rows (HF's converter)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def read_llama2c(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    h = _llama2c_header(path)
    if h is None or not is_llama2c_checkpoint(path):
        raise MillisError(f"{path} is not a llama2.c legacy (v0) checkpoint: its size does not match its header")
    dim, hidden, L, nh, nkv, vocab, seq = h
    cfg = LlamaConfig(vocab_size=abs(vocab), dim=dim, n_layers=L, n_heads=nh, n_kv_heads=nkv, max_seq=seq,
                      tie_head=vocab > 0, bos_id=1, eos_id=2, hidden_dim=hidden, norm_eps=1e-5)
    flat = torch.from_file(str(path), shared=False, size=28 // 4 + _llama2c_count(*h), dtype=torch.float32)[7:]
    hs, kv_dim, V = dim // nh, dim * nkv // nh, abs(vocab)
    off = 0

    def take(*shape):
        nonlocal off
        n = 1
        for s in shape:
            n *= s
        t = flat[off:off + n].view(*shape).clone()
        off += n
        return t

    emb = take(V, dim)
    rms_att, wq, wk, wv = take(L, dim), take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim)
    wo, rms_ffn = take(L, dim, dim), take(L, dim)
    w1, w2, w3 = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    sd = {"tok_emb.weight": emb, "norm.weight": take(dim)}
    off += seq * hs  # freq_cis_real and _imag (seq, hs/2 each): recomputed, as run.c does
    if vocab < 0:
        sd["head.weight"] = take(V, dim)
    for i in range(L):
        sd[f"layers.{i}.attn_norm.weight"] = rms_att[i]
        sd[f"layers.{i}.attn.wqkv.weight"] = torch.cat([_permute(wq[i], nh), _permute(wk[i], nkv), wv[i]])
        sd[f"layers.{i}.attn.wo.weight"] = wo[i]
        sd[f"layers.{i}.ffn_norm.weight"] = rms_ffn[i]
        sd[f"layers.{i}.ffn.w13.weight"] = torch.cat([w1[i], w3[i]])
        sd[f"layers.{i}.ffn.w2.weight"] = w2[i]
    return cfg, sd

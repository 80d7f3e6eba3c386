"""What both decoder families share: the step's `Batch`, the static KV cache, RoPE and attention.

The KV cache is allocated once at load: (max_batch, n_kv_heads, max_seq, head_dim) per layer, one
row per engine slot. A forward pass writes its new keys/values at each row's own positions and then
attends over the first `kv_len` positions of those rows; the boolean mask hides what a row may not
see (the future, another request's leftovers in a reused slot, and outside a sliding window).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Batch:
    """The inputs of one forward pass: B rows of T new tokens, each row in its own cache slot."""

    ids: torch.Tensor       # (B, T) token ids
    pos: torch.Tensor       # (B, T) position of each token in its slot
    slots: torch.Tensor     # (B,) KV cache row of each batch row
    kv_len: int             # keys attended: positions [0, kv_len) of each slot
    mask: torch.Tensor | None  # (B, 1, T, kv_len) True where the key is visible; None: see `causal`
    rows: slice | None      # the slots as a slice when consecutive: the cache is then read as a view
    last_only: bool = True  # logits of the last position of each row only (all a sampler needs)
    start: int | None = None  # every row starts at this position and `rows` is set: cache writes are slices
    causal: bool = False    # with mask None: plain causal attention (True) or every key visible (False)
    last: torch.Tensor | None = None  # (B,) with last_only: each row's position to give logits of; None: T - 1

    def last_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) -> (B, 1, dim) at each row's last position (last_only), else x."""
        if not self.last_only:
            return x
        return x[:, -1:] if self.last is None else x[torch.arange(x.shape[0], device=x.device), self.last][:, None]


def make_batch(ids: list[list[int]], starts: list[int], slots: list[int], window: int = 0,
               last_only: bool = True, device: str | torch.device = "cpu") -> Batch:
    """Rows of equal length T; row b holds positions starts[b] .. starts[b] + T - 1 of slot slots[b].

    The common cases need no mask, which keeps the step's tensor work small: a prompt prefilled from
    position 0 is plain causal attention, and a decode step whose rows share one position sees every
    key (in both, a sliding window that does not bite yet changes nothing)."""
    T = len(ids[0])
    kv_len = max(starts) + T
    consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
    rows = slice(slots[0], slots[0] + len(slots)) if consecutive else None
    same = all(s == starts[0] for s in starts)
    start = starts[0] if same and consecutive else None
    pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
    mask, causal = None, False
    if same and starts[0] == 0 and (not window or T <= window):
        causal = T > 1
    elif not (same and T == 1 and (not window or starts[0] < window)):
        mask = visible_keys(pos, kv_len, window)
    return Batch(ids=torch.tensor(ids, device=device), pos=pos, slots=torch.tensor(slots, device=device),
                 kv_len=kv_len, mask=mask, rows=rows, last_only=last_only, start=start, causal=causal)


def padded_batch(prompts: list[list[int]], slots: list[int], window: int = 0,
                 device: str | torch.device = "cpu") -> Batch:
    """New prompts of any lengths from position 0 in one forward, right-padded with token 0 to the longest,
    logits at each prompt's own last token. Causal attention: a row never sees its padding, whose cache
    writes land past its prompt, where its own decode writes each position before it reads it."""
    T = max(len(p) for p in prompts)
    b = make_batch([p + [0] * (T - len(p)) for p in prompts], [0] * len(prompts), slots, window, device=device)
    b.last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    return b


def visible_keys(pos: torch.Tensor, kv_len: int, window: int = 0) -> torch.Tensor:
    """The attention mask (B, 1, T, kv_len) of queries at positions `pos` (B, T): True where the key
    is visible, i.e. k <= q, and with a sliding window also q - window < k (as HF)."""
    key = torch.arange(kv_len, device=pos.device)                                          # (L,)
    mask = key <= pos[..., None]                                                           # (B, T, L)
    if window:
        mask &= key > pos[..., None] - window
    return mask[:, None]


class KVCache(nn.Module):
    def __init__(self, max_batch: int, n_kv: int, max_seq: int, head_dim: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        shape = (max_batch, n_kv, max_seq, head_dim)
        # zeros, not empty: masked positions are multiplied by 0 in attention, and 0 * NaN is NaN
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, b: Batch, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at the rows' positions; return keys/values (B, nkv, kv_len, hs)."""
        if b.start is not None:  # one slice per tensor: no index tensors
            T = k.shape[2]
            self.k[b.rows, :, b.start:b.start + T] = k
            self.v[b.rows, :, b.start:b.start + T] = v
        else:  # advanced indices (B,1),(B,T) around a slice put the indexed dims first: (B, T, nkv, hs)
            self.k[b.slots[:, None], :, b.pos] = k.transpose(1, 2)
            self.v[b.slots[:, None], :, b.pos] = v.transpose(1, 2)
        if b.rows is not None:
            return self.k[b.rows, :, :b.kv_len], self.v[b.rows, :, :b.kv_len]
        return self.k[b.slots, :, :b.kv_len], self.v[b.slots, :, :b.kv_len]


def rope_table(inv_freq: torch.Tensor, max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq, hs) in HF's rotate_half layout (the frequencies repeated for both halves)."""
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq.float())  # (S, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_inv_freq(c) -> torch.Tensor:
    """RoPE inverse frequencies (hs/2,) with the config's scaling, computed as HF does (fp32)."""
    hs = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if c.rope_type == "linear":
        return inv / c.rope_factor
    if c.rope_type == "llama3":
        low_wavelen = c.rope_original_max_seq / c.rope_low_freq_factor
        high_wavelen = c.rope_original_max_seq / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
        smooth = (c.rope_original_max_seq / wavelen - c.rope_low_freq_factor) / (
            c.rope_high_freq_factor - c.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs); cos, sin (B, 1, T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Fused qkv projection, optional RoPE, the slot cache, SDPA with grouped-query heads."""

    def __init__(self, dim: int, n_heads: int, n_kv: int, head_dim: int, qkv_bias: bool, out_bias: bool) -> None:
        super().__init__()
        self.nh, self.nkv, self.hs = n_heads, n_kv, head_dim
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv) * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, b: Batch, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs], dim=-1)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)   # (B, nh, T, hs)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = self.cache.update(b, k, v)                    # (B, nkv, kv_len, hs)
        if T == 1:  # decode: three small ops beat SDPA's kernel set-up for one query (0.06 ms a call here)
            y = _attend_one(q, k, v, b.mask, self.nh // self.nkv)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask, is_causal=b.causal,
                                               enable_gqa=self.nkv != self.nh)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, group: int):
    """Attention of one query per row: q (B, nh, 1, hs), k/v (B, nkv, L, hs), mask (B, 1, 1, L) or None.
    The `group` query heads of a kv head (consecutive, as in HF) become rows of one matmul."""
    B, nh, _, hs = q.shape
    s = torch.matmul(q.view(B, nh // group, group, hs), k.transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, nkv, g, L)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1, dtype=torch.float32).to(v.dtype)  # in fp32, as HF (bf16 scores: exp of bf16 differences)
    return torch.matmul(p, v).view(B, nh, 1, hs)


def setup_caches(model: nn.Module, max_batch: int, max_seq: int) -> None:
    """Give every Attention its (max_batch, n_kv, max_seq, hs) cache, in the model's dtype and device."""
    p = next(model.parameters())
    dtype = p.dtype if p.is_floating_point() else torch.float32
    for m in model.modules():
        if isinstance(m, Attention):
            m.cache = KVCache(max_batch, m.nkv, max_seq, m.hs, dtype, p.device)

"""Smoothing for the decoder embedders' int8-row precision (millis.gen.embedder), as SmoothQuant does it and as
millis.encoder.smooth does it for encoders: one activation scale per token lets a few outlier channels set the step
of every other channel, so per input channel j of each matrix s_j = amax_x(j)^alpha / amax_w(j)^(1 - alpha), and the
product is kept exact in fp32 by folding s into the weights, not into the kernels:

- q / k / v (input: the attention RMSNorm's rows): the norm's weight / s, the three matrices' columns x s;
- gate / up (input: the MLP RMSNorm's rows): the same with that norm;
- o (input: attention's output, linear in v): v's rows (and bias) / t, o's columns x t, with t one scale per KV
  head's channel (the query heads of a group read the same v rows, so they share it);
- down (input: silu(gate) x up, linear in up): up's rows / s, down's columns x s.

amax_x comes from a data-free calibration (CALIBRATION random token ids, seeded: a variant loads to the same bytes
every time): a torch forward of the fp32 weights under GGUF's names (millis.gen.load.llama_tensors) that records
each matrix's input.
"""
from __future__ import annotations

import numpy as np
import torch

from millis.common.errors import MillisError
from millis.encoder.smooth import smoothing_scales

CALIBRATION = (16, 64)  # sequences x tokens of random ids
GROUPS = ("qkv", "o", "gate_up", "down")  # the four matrix inputs of a layer


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """RoPE on x (B, T, heads, hd); cos, sin (T, hd / 2): HF's halves (neox) or GGUF's interleaved pairs."""
    a, b = (x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    c, s = cos[:, None], sin[:, None]
    ra, rb = a * c - b * s, a * s + b * c
    return torch.cat((ra, rb), -1) if neox else torch.stack((ra, rb), -1).flatten(-2)


def calibration_ids(c) -> torch.Tensor:
    """(B, T) seeded random token ids: CALIBRATION, T at most the model's positions."""
    B, T = CALIBRATION[0], min(CALIBRATION[1], c.max_seq)
    return torch.randint(0, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))


def input_amax(tensors: dict, c, neox: bool = True) -> list[dict[str, np.ndarray]]:
    """Per layer, the largest |x| per input channel of each group of GROUPS, on calibration_ids. tensors: fp32
    weights under GGUF's names (Qwen3's attn_q_norm / attn_k_norm when present); neox: RoPE on halves (HF's)."""
    from millis.gen.models.layers import rope_inv_freq

    arrays = {k: np.asarray(w.data, np.float32) for k, w in tensors.items()}
    t = {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}  # (mmapped: copied)
    ids = calibration_ids(c)
    B, T = ids.shape
    nh, nkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), rope_inv_freq(c).float())  # (T, hd / 2)
    cos, sin = freqs.cos(), freqs.sin()
    pos = torch.arange(T)
    mask = pos[None, :] <= pos[:, None]  # causal (query, key)
    if getattr(c, "sliding_window", 0):
        mask &= pos[None, :] > pos[:, None] - c.sliding_window
    amax = lambda x: x.abs().reshape(-1, x.shape[-1]).amax(0).numpy().copy()  # noqa: E731
    x, out = t["token_embd.weight"][ids], []
    with torch.no_grad():
        for i in range(c.n_layers):
            w = lambda n: t[f"blk.{i}.{n}"]  # noqa: E731
            bias = lambda n: t.get(f"blk.{i}.{n}.bias", 0)  # noqa: E731
            seen = {}
            h = rms(x, w("attn_norm.weight"), c.norm_eps)
            seen["qkv"] = amax(h)
            q = (h @ w("attn_q.weight").T + bias("attn_q")).view(B, T, nh, hd)
            k = (h @ w("attn_k.weight").T + bias("attn_k")).view(B, T, nkv, hd)
            v = (h @ w("attn_v.weight").T + bias("attn_v")).view(B, T, nkv, hd)
            if f"blk.{i}.attn_q_norm.weight" in t:
                q, k = rms(q, w("attn_q_norm.weight"), c.norm_eps), rms(k, w("attn_k_norm.weight"), c.norm_eps)
            q, k = rotate(q, cos, sin, neox), rotate(k, cos, sin, neox)
            k, v = (z.repeat_interleave(nh // nkv, dim=2) for z in (k, v))
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd ** 0.5
            att = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
            att = att.reshape(B, T, nh * hd)
            seen["o"] = amax(att)
            x = x + att @ w("attn_output.weight").T
            h = rms(x, w("ffn_norm.weight"), c.norm_eps)
            seen["gate_up"] = amax(h)
            g = torch.nn.functional.silu(h @ w("ffn_gate.weight").T) * (h @ w("ffn_up.weight").T)
            seen["down"] = amax(g)
            x = x + g @ w("ffn_down.weight").T
            out.append(seen)
    return out


def check_amax(amax: list[dict[str, np.ndarray]] | None, c, where) -> None:
    """A stored calibration's widths against the model's inputs (qkv and gate_up: dim; o: heads x head size; down:
    the FFN's width); None (no file) passes."""
    want = {"qkv": c.dim, "o": c.n_heads * c.head_dim, "gate_up": c.dim, "down": c.hidden_dim}
    for i, seen in enumerate(amax or ()):
        for g, n in want.items():
            if np.shape(seen[g]) != (n,):
                raise MillisError(f"{where}: the smoothing calibration's layer {i} {g} has {np.shape(seen[g])} "
                                  f"values, this model's input has {n}: not this model's calibration")


def smoothed(tensors: dict, amax: list[dict[str, np.ndarray]], c, alpha: float) -> dict:
    """tensors (fp32, GGUF's names) with every layer's smoothing folded in (the module's docstring): the same
    products in exact arithmetic, the activations' outlier channels moved into the weights' rows."""
    from millis.gen.load import Weight

    out = dict(tensors)
    get = lambda n: np.asarray(out[n].data, np.float32)  # noqa: E731

    def put(n: str, a: np.ndarray) -> None:
        out[n] = Weight("F32", tuple(a.shape), np.ascontiguousarray(a, np.float32))

    nh, nkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    for i, seen in enumerate(amax):
        b = f"blk.{i}."
        for norm, mats, group in (("attn_norm", ("attn_q", "attn_k", "attn_v"), "qkv"),
                                  ("ffn_norm", ("ffn_gate", "ffn_up"), "gate_up")):
            s = smoothing_scales(seen[group], np.concatenate([get(b + m + ".weight") for m in mats]), alpha)
            put(b + norm + ".weight", get(b + norm + ".weight") / s)
            for m in mats:
                put(b + m + ".weight", get(b + m + ".weight") * s)
        s = smoothing_scales(seen["down"], get(b + "ffn_down.weight"), alpha)
        put(b + "ffn_up.weight", get(b + "ffn_up.weight") / s[:, None])
        put(b + "ffn_down.weight", get(b + "ffn_down.weight") * s)
        # o: one scale per KV head's channel, the largest over the query heads of its group on both sides
        wo = get(b + "attn_output.weight")
        xa = seen["o"].reshape(nkv, nh // nkv, hd).max(1)
        wa = np.abs(wo).max(0).reshape(nkv, nh // nkv, hd).max(1)
        t = smoothing_scales(xa.reshape(-1), wa.reshape(1, -1), alpha)  # (nkv * hd,)
        put(b + "attn_v.weight", get(b + "attn_v.weight") / t[:, None])
        if b + "attn_v.bias" in out:
            put(b + "attn_v.bias", get(b + "attn_v.bias") / t)
        put(b + "attn_output.weight", wo * np.repeat(t.reshape(nkv, 1, hd), nh // nkv, 1).reshape(-1))
    return out

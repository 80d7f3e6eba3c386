"""Batched sampling on the device: each row has its own temperature, top-k, top-p, repetition penalty
and random generator, and nothing here reads a value back to the host.

The order is HF `generate`'s: repetition penalty, temperature, top-k, top-p. A row with temperature
0 (below GREEDY_BELOW) is greedy; a top-k above the vocabulary keeps all. Sampling is an exponential
race (argmax of p / E with E ~ Exp(1), as gpt-fast does): each row draws its noise from its own
generator, so a seeded request gets the same tokens whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from millis.gen.config import SamplingParams


@dataclass
class RowParams:
    """The sampling inputs of one step, one entry per batch row."""

    params: list[SamplingParams]
    generators: list[torch.Generator]
    seen: torch.Tensor | None  # (B, V) bool: tokens in each row's prompt or output (repetition penalty)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) index of each row's first maximum. fp32 on the CPU goes through numpy: torch's
    argmax over a 128K vocabulary takes ~140 us against numpy's ~12 (a greedy decode step of a
    small model is a few ms). Same ties (first maximum) and NaN rule (first NaN) either way."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def sample(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """logits (B, V) fp32 -> token ids (B,) on the same device."""
    ps, dev = rows.params, logits.device
    if rows.seen is not None and any(p.repetition_penalty != 1.0 for p in ps):
        pen = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        logits = torch.where(rows.seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    greedy = argmax_rows(logits)
    if all(p.greedy for p in ps):
        return greedy
    V = logits.shape[-1]
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in ps], device=dev)[:, None]
    top_k = torch.tensor([min(p.top_k or V, V) for p in ps], device=dev)[:, None]  # above V: all
    top_p = torch.tensor([p.top_p for p in ps], device=dev)[:, None]
    srt, idx = (logits / temp).sort(dim=-1, descending=True)                  # (B, V)
    rank = torch.arange(V, device=dev)[None]
    srt = srt.masked_fill(rank >= top_k, float("-inf"))
    probs = srt.softmax(-1)
    # drop a token when the mass before it already reaches top_p (the most likely one always stays)
    srt = srt.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    probs = srt.softmax(-1)
    noise = torch.stack([torch.empty(V, device=dev).exponential_(1, generator=g) for g in rows.generators])
    choice = (probs / noise).argmax(-1, keepdim=True)                         # (B, 1) rank sampled
    sampled = idx.gather(-1, choice).squeeze(-1)
    is_greedy = torch.tensor([p.greedy for p in ps], device=dev)
    return torch.where(is_greedy, greedy, sampled)

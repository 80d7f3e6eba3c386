"""Batched sampling on the device: each row has its own temperature, top-k, top-p, penalties, logit
bias and random stream, and nothing here reads a value back to the host.

The order: logit bias, repetition penalty, presence / frequency penalties (OpenAI's: c * frequency +
(c > 0) * presence off a token's logit, c its count in the output), then HF `generate`'s temperature,
top-k, top-p. A row with temperature 0 (below GREEDY_BELOW) is greedy; a top-k above the vocabulary
keeps all. A sampled row takes the token where one uniform draw falls in its filtered distribution's
cumulative sum (inverse CDF, in fp64). The draw is a hash of the request's seed and of how many tokens
it has drawn (splitmix64), computed on the host: no random-number kernel per row, one host-to-device
copy per step for every row's parameters, and a seeded request gets the same tokens whatever shares
its batch, on any device, also when its row is retried alone after a batch-mate raised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from millis.gen.config import SamplingParams


@dataclass
class RowParams:
    """The sampling inputs of one step, one entry per batch row."""

    params: list[SamplingParams]
    seeds: list[int]           # each request's seed (any int: taken modulo 2**64)
    drawn: list[int]           # tokens each request has drawn before this step: its position in its stream
    seen: torch.Tensor | None  # (B, V) bool: tokens in each row's prompt or output (repetition penalty)
    counts: torch.Tensor | None = None  # (n, V) fp32, the rows with a presence or frequency penalty in order:
    #                                     times each token is in that row's output


MASK64 = (1 << 64) - 1


def uniform(seed: int, n: int) -> float:
    """The n-th draw of seed's stream, in [0, 1): splitmix64's finalizer over (seed, n)."""
    x = (seed * 0x9E3779B97F4A7C15 + (n + 1) * 0xD1B54A32D192ED03) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


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
    if any(p.logit_bias for p in ps):  # (row, token id, bias) triples
        r, t, b = zip(*((i, t, b) for i, p in enumerate(ps) for t, b in p.logit_bias))
        logits = logits.index_put((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                                  torch.tensor(b, dtype=logits.dtype, device=dev), accumulate=True)
    if rows.seen is not None and any(p.repetition_penalty != 1.0 for p in ps):
        pen = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        logits = torch.where(rows.seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    if rows.counts is not None:  # only the penalized rows' (n, V): a batch of plain rows copies nothing
        idx = [i for i, p in enumerate(ps) if p.counts_output]
        fp = torch.tensor([[ps[i].frequency_penalty, ps[i].presence_penalty] for i in idx], dtype=logits.dtype,
                          device=dev)
        c = rows.counts.to(logits.dtype)
        off = c * fp[:, 0:1] + (c > 0).to(logits.dtype) * fp[:, 1:2]
        logits = logits.index_add(0, torch.tensor(idx, device=dev), -off)
    greedy = argmax_rows(logits)
    if all(p.greedy for p in ps):
        return greedy
    V = logits.shape[-1]
    # every row's parameters and draw in one host-to-device copy: (B, 5) temperature, top-k, top-p, greedy, u
    host = torch.tensor([[1.0 if p.greedy else p.temperature, min(p.top_k or V, V), p.top_p, p.greedy, uniform(s, n)]
                         for p, s, n in zip(ps, rows.seeds, rows.drawn)], dtype=torch.float64)
    prm = host.to(dev, non_blocking=True)
    temp, top_k, top_p = prm[:, 0:1].to(logits.dtype), prm[:, 1:2], prm[:, 2:3]
    srt, idx = (logits / temp).sort(dim=-1, descending=True)                  # (B, V)
    rank = torch.arange(V, device=dev)[None]
    srt = srt.masked_fill(rank >= top_k, float("-inf"))
    probs = srt.softmax(-1)
    # drop a token when the mass before it already reaches top_p (the most likely one always stays)
    srt = srt.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    cdf = srt.softmax(-1).double().cumsum(-1)                                 # (B, V), flat past the kept tokens
    # the first rank whose cumulative mass passes u: never a dropped token (u < 1, right=True)
    choice = torch.searchsorted(cdf, prm[:, 4:5] * cdf[:, -1:], right=True).clamp_(max=V - 1)  # (B, 1)
    sampled = idx.gather(-1, choice).squeeze(-1)
    return torch.where(prm[:, 3].bool(), greedy, sampled)


class SlotPenalties:
    """What the penalties read, per engine slot: `seen` (slots, V) bool, the tokens of the slot's prompt and
    output (repetition penalty), and `counts` (slots, V) fp32, how often each token is in its output (presence
    / frequency; made at the first request with one). A slot's rows are reset when a request that reads them
    takes it, and only such requests keep them up to date."""

    def __init__(self, slots: int, vocab: int, device) -> None:
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.counts: torch.Tensor | None = None

    def admit(self, slot: int, prompt: list[int], params: SamplingParams) -> None:
        self.seen[slot] = False
        self.seen[slot, torch.tensor(prompt, device=self.seen.device)] = True
        if params.counts_output:
            if self.counts is None:
                self.counts = torch.zeros(self.seen.shape, device=self.seen.device)
            self.counts[slot] = 0

    def move(self, dst: int, src: int) -> None:
        """A request moved from slot src to dst (the CUDA-graph decode's compaction)."""
        for t in (self.seen, self.counts):
            if t is not None:
                t[dst] = t[src]

    def sample(self, logits: torch.Tensor, slots: list[int], params: list[SamplingParams], seeds: list[int],
               drawn: list[int]) -> torch.Tensor:
        """`sample` over rows in these slots, then the drawn tokens into the rows that read them."""
        pen = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        cnt = [i for i, p in enumerate(params) if p.counts_output]
        at = torch.tensor(slots, device=self.seen.device) if pen or cnt else None
        tok = sample(logits, RowParams(params, seeds, drawn, self.seen[at] if pen else None,
                                       self.counts[at[cnt]] if cnt else None))
        if pen:
            self.seen[at[pen], tok[pen]] = True
        if cnt:  # one row per slot: no index twice
            self.counts[at[cnt], tok[cnt]] += 1
        return tok

"""Batched sampling on the device: each row has its own temperature, top-k, top-p, penalties, logit
bias and random stream, and nothing here reads a value back to the host.

The order: logit bias, repetition penalty, presence / frequency penalties (OpenAI's: c * frequency +
(c > 0) * presence off a token's logit, c its count in the output), then HF `generate`'s temperature,
top-k, top-p. A row with temperature 0 (below GREEDY_BELOW) is greedy; a top-k above the vocabulary
keeps all. A sampled row takes the token where one uniform draw falls in its filtered distribution's
cumulative sum (inverse CDF, in fp64): over the vocabulary in its own order when nothing is filtered, over
the tokens sorted most likely first when top-k or top-p filter (on the CPU the sort is a partial one of the
HEAD most likely where the kept tokens are among them: a sort of a 49K vocabulary took 4 ms a row, most of a
small model's step). The draw is a hash of the request's seed and of how many tokens
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


def ranked(lp: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The k likeliest (id, log p) of a (V,) row, best first, a tie in id order as argmax_rows breaks it (so
    greedy's token leads its own top_logprobs: topk put the highest id of a tie first); k past V: all V."""
    k = min(k, lp.numel())
    if k <= 0:
        return ()
    ids = torch.nonzero(lp >= lp.topk(k).values[-1]).flatten()  # every id tied with the k-th too, ascending
    order = torch.sort(lp[ids], descending=True, stable=True).indices[:k]
    return tuple(zip(ids[order].tolist(), lp[ids[order]].tolist()))


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
    z = logits / prm[:, 0:1].to(logits.dtype)                                  # (B, V)
    def unfiltered(t: torch.Tensor) -> torch.Tensor:  # (B,) rows whose top-k keeps all and top-p is 1
        return (t[:, 1] >= V) & (t[:, 2] >= 1.0)
    sampled = ~host[:, 3].bool()
    whole = (sampled & unfiltered(host)).nonzero().squeeze(-1).tolist()
    cut = (sampled & ~unfiltered(host)).nonzero().squeeze(-1).tolist()
    if dev.type != "cpu":  # no host reads and no index copies: the rows both ways where both occur, each its own
        a = draw(z.softmax(-1).double().cumsum(-1), prm[:, 4:5]) if whole else None
        b = filtered(z, prm) if cut else a
        a = b if a is None else a
        return torch.where(prm[:, 3].bool(), greedy, torch.where(unfiltered(prm), a, b))
    out = greedy.clone()
    if whole:  # the inverse CDF over the vocabulary in its own order: no sort (a sort of V was most of a step)
        cdf = z[whole].softmax(-1).double().cumsum(-1)
        out[whole] = draw(cdf, prm[whole, 4:5])
    if cut:
        out[cut] = filtered_on_host(z[cut], prm[cut], host[cut])
    return out


def draw(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(n, m) fp64 cumulative masses, (n, 1) uniforms -> (n,) the first column whose mass passes u of the row's
    total: never a dropped (flat) column, since u < 1 and right=True."""
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def filtered(z: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
    """HF's top-k then top-p over the candidates `z` (n, V) sorted, then the inverse CDF: token ids (n,)."""
    vals, idx = z.sort(dim=-1, descending=True)
    return idx.gather(-1, pick_sorted(vals, prm)[:, None]).squeeze(-1)


def pick_sorted(vals: torch.Tensor, prm: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """vals (n, m) sorted descending, every token of the rows' top-k / top-p sets among them -> (n,) ranks.
    lse (n, 1): the log of the mass top-p is measured against when `vals` are not all the rows' tokens (the
    whole vocabulary's), else the softmax over the top-k set."""
    rank = torch.arange(vals.shape[-1], device=vals.device)[None]
    srt = vals.masked_fill(rank >= prm[:, 1:2], float("-inf"))
    probs = srt.softmax(-1) if lse is None else (srt - lse).exp()
    # drop a token when the mass before it already reaches top_p (the most likely one always stays)
    srt = srt.masked_fill(probs.cumsum(-1) - probs >= prm[:, 2:3], float("-inf"))
    return draw(srt.softmax(-1).double().cumsum(-1), prm[:, 4:5])


HEAD = 256  # on the CPU, the candidates a filtered row is first looked for in (a partial sort, not one of V)


def filtered_on_host(z: torch.Tensor, prm: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """`filtered` without sorting the vocabulary where the kept tokens are among the HEAD most likely: top-k up to
    HEAD (its set is in the head), or top-p over the whole vocabulary whose nucleus the head's mass covers. Other
    rows (a nucleus past the head: a flat distribution) take the full sort. Reads values back: CPU only."""
    n, V = z.shape
    m = min(V, HEAD)
    vals, idx = z.topk(m, dim=-1)                                          # (n, m) sorted descending
    top_k, top_p = host[:, 1], host[:, 2]
    in_head = top_k <= m  # the whole top-k set is in the head
    lse = z.logsumexp(-1, keepdim=True) if (top_k >= V).any() else None  # (n, 1): the vocabulary's mass
    if lse is not None:  # no top-k: the head's mass passes top-p, the nucleus ends in it (by a margin: within 1e-6
        # the sort's own sums decide, which may keep a token past the head)
        in_head |= (top_k >= V) & ((vals - lse).exp().sum(-1).double() >= top_p + 1e-6)
    out = torch.empty(n, dtype=torch.int64)
    for rows, norm in ((in_head & (top_k <= m), None), (in_head & (top_k > m), lse)):
        if rows.any():
            h = rows.nonzero().squeeze(-1)
            ranks = pick_sorted(vals[h], prm[h], None if norm is None else norm[h])
            out[h] = idx[h].gather(-1, ranks[:, None]).squeeze(-1)
    if not in_head.all():
        rest = (~in_head).nonzero().squeeze(-1)
        out[rest] = filtered(z[rest], prm[rest])
    return out


class SlotPenalties:
    """What the penalties read, per engine slot: `seen` (slots, V) bool, the tokens of the slot's prompt and
    output (repetition penalty), and `counts` (slots, V) fp32, how often each token is in its output (presence
    / frequency; made at the first request with one). A slot's rows are reset when a request that reads them
    takes it, and only such requests keep them up to date."""

    def __init__(self, slots: int, vocab: int, device) -> None:
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.counts: torch.Tensor | None = None

    def admit(self, slot: int, prompt: list[int], params: SamplingParams, out: list[int] = ()) -> None:
        """A request takes the slot; `out`: the tokens it generated before (a preempted request returning)."""
        self.seen[slot] = False
        self.seen[slot, torch.tensor(list(prompt) + list(out), device=self.seen.device)] = True
        if params.counts_output:
            if self.counts is None:
                self.counts = torch.zeros(self.seen.shape, device=self.seen.device)
            self.counts[slot] = 0
            if out:
                self.counts[slot] = torch.bincount(torch.tensor(list(out)), minlength=self.seen.shape[1]).to(
                    self.counts)

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

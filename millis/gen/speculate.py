"""Prompt-lookup speculative decoding, for greedy requests on the native (GGUF) models.

A draft is the tokens that followed the latest earlier occurrence of the sequence's last n tokens
(n = 3, else 2, else 1 once a draft of the request was accepted: prompt lookup, as HF
`prompt_lookup_num_tokens`). Extraction, editing and
code answers quote their input, so drafts are often right there. The model then runs the row's
last token and its draft in one forward (the flat batch: every token at its own position), and the
row keeps the longest prefix of the draft equal to the model's own greedy choices, plus the model's
token after it: 1 to k + 1 tokens for one pass over the weights.

Greedy text is identical with and without drafts (tested): the native kernels give every token the
logits plain decoding gives it (no sum depends on batch-mates or on how many tokens a call holds),
and positions written for rejected draft tokens are written again before anything attends to them.
A request that gains under MIN_GAIN tokens per verify stops drafting (`DraftStats.off`), so text that does
not repeat costs at most MIN_VERIFIES verifies of drafts of FIRST_DRAFTS. (The share of drafted tokens kept
was the rule: a long draft's later tokens are rarely right, so a larger --speculate switched off requests a
short one sped up: on stories260K, 1.15 tokens a step at speculate 3, 1.04 at 4 to 12. Drafts shortened
after a partial acceptance were tried too: copying a passage, where a miss is one token and the copy goes
on, then kept fewer tokens a verify, 686 of 840 drafted against 728 of 896.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from millis.gen.rows import isolated

NGRAMS = (3, 2, 1)   # suffix lengths looked up, longest first
MIN_VERIFIES = 4     # drafts verified before a request's gain may switch drafting off
FIRST_DRAFTS = 2     # draft length until one of the request's drafts was accepted
MIN_GAIN = 0.3       # ... when its drafts kept fewer tokens than this per verify
INDEX_PER_STEP = 4096  # prompt positions a request's n-gram index takes in a step (~7 ms)


@dataclass
class DraftStats:
    drafted: int = 0   # draft tokens verified
    accepted: int = 0  # of them, kept
    verifies: int = 0  # drafts verified
    index: NgramIndex | None = None  # a request's: its tokens' n-grams, once it drafts

    @property
    def off(self) -> bool:
        return self.verifies >= MIN_VERIFIES and self.accepted < MIN_GAIN * self.verifies

    def record(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and `accepted` of them kept."""
        self.drafted, self.accepted, self.verifies = self.drafted + drafted, self.accepted + accepted, self.verifies + 1


def lookup(ctx: list[int], k: int, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of ctx's last n tokens (n >= min_n)."""
    seq = np.asarray(ctx, dtype=np.int64)
    for n in NGRAMS:
        if len(seq) <= n or n < min_n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # those ending before the last token
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if len(hits):
            i = int(hits[-1]) + n
            return seq[i:i + k].tolist()
    return []


class NgramIndex:
    """`lookup` kept up as a request's tokens come (prompt, then output; neither ever shrinks): the latest start
    of every n-gram that ends before the last token, so a lookup is a dict read. (`lookup` over the whole
    context each step cost 0.18 / 0.54 / 2.3 ms a row at 2 K / 8 K / 32 K tokens, and a row whose lookups never
    match never drafts, so nothing switched it off.) Keys: an n-gram's ids as one integer (base 2^32)."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[int, int]] = {n: {} for n in NGRAMS}
        self.ends = 0  # windows ending at positions < ends are in

    def key(self, tokens, start: int, n: int) -> int:
        k = 0
        for t in tokens[start:start + n]:
            k = (k << 32) + t
        return k

    def lookup(self, prompt: list[int], out: list[int], k: int, min_n: int = 1) -> list[int]:
        """lookup(prompt + out, k, min_n), without building prompt + out."""
        length, split = len(prompt) + len(out), len(prompt)

        def span(a: int, b: int) -> list[int]:  # tokens [a, b) of prompt + out
            return (prompt[a:b] if a < split else []) + (out[max(a - split, 0):b - split] if b > split else [])
        if self.ends < length - 1:  # at most INDEX_PER_STEP positions a call (a long prompt: no draft until in)
            upto = min(length - 1, self.ends + INDEX_PER_STEP)
            first = max(self.ends - NGRAMS[0] + 1, 0)
            new = span(first, upto)  # what the new windows read
            for end in range(self.ends, upto):
                for n in NGRAMS:
                    if end - n + 1 >= 0:
                        self.latest[n][self.key(new, end - n + 1 - first, n)] = end - n + 1
            self.ends = upto
            if upto < length - 1:
                return []
        tail = span(max(length - NGRAMS[0], 0), length)
        for n in NGRAMS:
            if length <= n or n < min_n:
                continue
            j = self.latest[n].get(self.key(tail, len(tail) - n, n))
            if j is not None:
                return span(j + n, min(j + n + k, length))
        return []


def draftable(params, stats: DraftStats) -> bool:
    """Only greedy rows without penalties, logit bias, logprobs or a grammar are drafted (their tokens are
    the argmax of the model's own logits), and only while drafting pays."""
    return params.greedy and params.plain and params.logprobs < 0 and not params.grammar and not stats.off


def draft(params, stats: DraftStats, prompt: list[int], out: list[int], k: int) -> list[int]:
    """A request's prompt-lookup draft of at most k tokens (`draftable` rows only)."""
    if k < 1 or not draftable(params, stats):
        return []
    if stats.index is None:
        stats.index = NgramIndex()
    # until a draft of the request has been right, drafts are short and need a match of 2+ tokens: text
    # that does not repeat pays little before drafting switches off
    return stats.index.lookup(prompt, out, k, 1) if stats.accepted else \
        stats.index.lookup(prompt, out, min(k, FIRST_DRAFTS), 2)


def row_drafts(running: list, failed: dict[str, str], kv, drafter, speculate: int, limit_of) -> list[tuple]:
    """(request, draft tokens) per running row: prompt lookup, or `drafter`'s proposals (a draft_model.DraftModel).
    A row drafts at most `speculate` tokens, fewer where its limit (`limit_of`: positions it may fill) or
    max_tokens is near (the verify brings one token more). Nothing of the target's KV is promised for drafts
    ahead: a row that has a draft grows its promise for it here, after the step's admissions and from blocks
    nobody holds or was promised, and what does not fit is cut off (a draft writes no KV outside its slot's
    promise). A row whose drafting switched off gives its draft-model cache back to rows that draft."""
    rows = []
    for r in running:
        room = min(limit_of(r) - len(r.prompt) - len(r.out), r.params.max_tokens - len(r.out)) - 1
        k = min(speculate, room) if kv is not None and r.matcher is None else 0
        if drafter is not None and not draftable(r.params, r.drafts):
            drafter.release(r.slot)  # nothing if it holds no draft cache (sampled rows, or released before)
            k = 0
        rows.append((r, k))
    if drafter is None:
        got = [isolated(failed, r, lambda r=r, k=k: draft(r.params, r.drafts, r.prompt, r.out, k)) for r, k in rows]
    else:
        try:
            got = drafter.propose([(r.prompt, r.out, r.slot, k) for r, k in rows])
        except Exception:  # noqa: BLE001 -- the draft model failed: this step decodes plainly
            got = [[] for _ in rows]
    out = []
    for (r, _), d in zip(rows, got):
        if d:  # the verify writes positions n - 1 .. n - 1 + len(d): n + len(d) positions (n: the row's length)
            n = len(r.prompt) + len(r.out)
            kv.grow(r.slot, n + len(d))  # if free; the row's own next positions: it takes them as it goes on
            d = d[:max(kv.promised(r.slot) - n, 0)]
        out.append((r, d))
    return out


def verify(model, rows: list[tuple[int, int, int, list[int]]]) -> list:
    """rows: (last token, its position, slot, draft). One forward of every row's last token and draft.
    Per row with a draft, the tokens it gains: the draft's prefix the model agrees with, then the
    model's next. Per row without one (a plain decode row in the same step): its logits (vocab,)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    for t, p, s, d in rows:
        ids += [t] + d
        pos += range(p, p + len(d) + 1)
        slots += [s] * (len(d) + 1)
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    logits = model.forward_flat(i32(ids), i32(pos), i32(slots), np.arange(len(ids), dtype=np.int32))
    out: list = []
    at = 0
    for _, _, _, d in rows:
        if not d:
            out.append(logits[at])
            at += 1
            continue
        pred = logits[at:at + len(d) + 1].argmax(-1).tolist()
        at += len(d) + 1
        a = 0
        while a < len(d) and d[a] == pred[a]:
            a += 1
        out.append(d[:a] + [pred[a]])
    return out

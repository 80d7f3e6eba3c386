"""Speculative decoding with a draft model: a smaller GGUF model of the same vocabulary proposes the next
k greedy tokens of each greedy row, and the target model verifies them in its one forward per step
(`speculate.verify`, the same as prompt-lookup drafts), so the text is the target's own greedy text.

The draft model has its own paged KV cache, slot for slot with the engine's. Per slot it remembers
how many leading positions of the sequence its cache holds (`done`). A step's proposal first feeds
what the cache misses (the prompt at the start, then the tokens the target accepted), all rows in one
flat forward, which also gives each row its first draft token. Then k - 1 single-token forwards,
all rows together, give the rest. Positions written for draft tokens are rewritten next step
before anything attends to them, as in the target's cache. A slot whose draft cache cannot hold
its request gets no drafts (the draft is an optimisation, never a condition of admission) until a slot gives
its blocks back: its request ended, or its drafting switched off (the engine then `release`s it at once).

The catch-up feeds at most `budget` tokens a step, all rows together (the engine's prefill budget): rows
missing the fewest go first, so rows already caught up draft every step, and a new row's prompt goes in over
several steps, the row decoding without drafts until it is in (its text is the same either way).
"""
from __future__ import annotations

import logging

import numpy as np

from millis.common.errors import MillisError
from millis.gen.config import PREFILL_TOKENS
from millis.gen.models.native_llama import CHUNK

log = logging.getLogger("millis.gen")

PROBE = "The quick brown fox: 3.14, {\"a\": [1, 2]} \u00e9t\u00e9 \u4f60\u597d"  # tokenizers must agree on this


def _tail(prompt: list[int], out: list[int], start: int) -> list[int]:
    """(prompt + out)[start:] (at least the newest token) without copying the whole sequence."""
    start = min(start, len(prompt) + len(out) - 1)
    return prompt[start:] + out if start < len(prompt) else out[start - len(prompt):]


class DraftModel:
    def __init__(self, loaded, target, budget: int = PREFILL_TOKENS["cpu"]) -> None:
        """`loaded`: the draft's millis.gen.load.Loaded (native); `target`: the engine's Loaded; `budget`: tokens
        the catch-up feeds a step."""
        if loaded.kv is None:
            raise MillisError("a draft model must be a GGUF model (millis's native kernels)")
        c, t = loaded.config, target.config
        if c.vocab_size != t.vocab_size or c.eos_id != t.eos_id:
            raise MillisError(f"the draft model's vocabulary ({c.vocab_size} tokens, EOS {c.eos_id}) is not the "
                              f"target's ({t.vocab_size}, EOS {t.eos_id})")
        if loaded.tokenizer is not None and target.tokenizer is not None and \
                loaded.tokenizer.encode(PROBE) != target.tokenizer.encode(PROBE):
            raise MillisError("the draft model's tokenizer splits text differently from the target's")
        self.model, self.kv, self.max_seq, self.budget = loaded.model, loaded.kv, loaded.max_seq, budget
        self.failures = 0  # propose calls that raised
        self.done: dict[int, int] = {}  # slot -> leading positions of its sequence held in the draft cache
        self.waiting: dict[int, int] = {}  # slot -> positions its request needs, while the cache has no room
        self.freed = False  # a slot gave blocks back since the waiting slots last tried

    def admit(self, slot: int, n_pos: int) -> bool:
        """Room in the draft's cache for n_pos positions; False (no drafts for this slot alone) when they do
        not fit, also past the draft's own context (its forward would raise, failing every row's drafts). Slots
        waiting since before take blocks given back first."""
        if slot not in self.waiting:
            self.retry_waiting()
        ok = n_pos <= self.max_seq and self.kv.reserve(slot, n_pos)
        if ok:
            self.done[slot] = 0
            self.waiting.pop(slot, None)
        elif n_pos <= self.max_seq:  # tried again once another slot gives its blocks back
            self.waiting[slot] = n_pos
        return ok

    def release(self, slot: int) -> None:
        """Give `slot`'s draft-cache blocks back: its request ended, or its drafting switched off (then again at
        its end, which finds nothing to give back). The slot proposes nothing until `admit`ted again."""
        self.waiting.pop(slot, None)
        if self.done.pop(slot, None) is not None:
            self.kv.release(slot)
            self.freed = True

    def retry_waiting(self) -> None:
        """Blocks given back: slots admitted while the cache was full try again, in their order."""
        if self.freed:
            self.freed = False
            for slot, n_pos in list(self.waiting.items()):
                self.admit(slot, n_pos)

    def propose(self, rows: list[tuple[list[int], list[int], int, int]]) -> list[list[int]]:
        """rows: (prompt, output so far, slot, k). k greedy draft tokens per row ([] for a slot not admitted). A
        failure of the draft model gives no drafts this step (the target decodes plainly), counted in `failures`
        and logged (the engine's catch-all dropped it unseen, and each step paid a partial catch-up)."""
        try:
            return self.drafts(rows)
        except Exception as e:  # noqa: BLE001 -- a draft is an optimisation: never a request's failure
            self.failures += 1
            if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                log.warning("draft model failed (%d so far): %s: %s", self.failures, type(e).__name__, e)
            return [[] for _ in rows]

    def drafts(self, rows: list[tuple[list[int], list[int], int, int]]) -> list[list[int]]:
        self.retry_waiting()
        live = [(_tail(prompt, out, self.done[slot]), len(prompt) + len(out), slot, k)
                for prompt, out, slot, k in rows if slot in self.done and k > 0]
        out: dict[int, list[int]] = {}
        ids, pos, slots, last, budget, fed, ready = [], [], [], [], self.budget, {}, []
        for tail, n, slot, k in sorted(live, key=lambda row: len(row[0])):  # catch up: what the cache misses
            start, tail = n - len(tail), tail[:budget]  # past the budget: the rest next step, no draft now
            budget -= len(tail)
            while len(tail) > CHUNK:  # a long prompt: its head in chunks of bounded scratch
                self.model.forward_flat(*(np.asarray(a, dtype=np.int32) for a in (
                    tail[:CHUNK], range(start, start + CHUNK), [slot] * CHUNK, [])))
                tail, start = tail[CHUNK:], start + CHUNK
            ids += tail
            pos += range(start, start + len(tail))
            slots += [slot] * len(tail)
            fed[slot] = start + len(tail)
            if fed[slot] == n:  # in up to the newest token: its logits give the first draft token
                last.append(len(ids) - 1)
                ready.append((n, slot, k))
        if ids:
            tok = self._forward(ids, pos, slots, last)
            self.done.update(fed)
            for (_, slot, _), t in zip(ready, tok):
                out[slot] = [t]
            for j in range(1, max((k for *_, k in ready), default=0)):
                more = [(n, slot) for n, slot, k in ready if k > j]
                tok = self._forward([out[s][-1] for _, s in more], [n + j - 1 for n, _ in more],
                                    [s for _, s in more], list(range(len(more))))
                for (_, slot), t in zip(more, tok):
                    out[slot].append(t)
        return [out.get(slot, []) for _, _, slot, _ in rows]

    def _forward(self, ids, pos, slots, rows) -> list[int]:
        i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
        return self.model.forward_flat(i32(ids), i32(pos), i32(slots), i32(rows)).argmax(-1).tolist()

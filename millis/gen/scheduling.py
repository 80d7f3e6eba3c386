"""The engine's schedule: which prompt tokens a step prefills, and which waiting requests it admits.

Prefill budget: a step prefills at most `budget` prompt tokens, all requests together (EngineConfig.
prefill_tokens_per_step), so a long prompt stalls the running rows by a bounded time a step, not by its whole
length: it is prefilled in chunks over several steps while it holds its slot (`Request.prefilled`: the
leading prompt positions whose KV is written) and the running rows decode a token every step. A prompt
part-way prefilled continues first; what is left of the budget starts waiting requests, each with the
rest of the budget, so a step ends with at most one prompt part-way. While a request waits and a slot is
free, the part-way prompts take at most half the budget, and the other half starts waiting prompts short
enough to be prefilled whole in it (a longer one waits its turn, passed and counted as below, and keeps a free
slot for itself: it starts when the part-way prompt ends, as before); what those leave goes back to the
part-way prompts, and where that ends them, the rest starts the next in line. So a short request behind a
long prompt starts in the next step, not after that prompt's whole prefill (an 8k-token prompt: ~30 steps of
256 tokens), and the long prompt still gets at least half the budget every step (vLLM's
long_prefill_token_threshold is this idea, a fixed cap a step per prompt). A request mostly in the prefix
cache is judged by what it would prefill (`need`: a chat turn behind a long shared system prompt is short).
Chunking does not change tokens:
a chunk attends to the positions before it through the cache, and the native kernels give every token the
logits a whole prefill gives it (tests/test_gen_native.py, CHUNK).

Admission: the queue is FIFO, but a request that cannot start now (its promise, its feed and a block, does not
fit the KV pool, or its prefix is being prefilled by another request and it will share it) does not hold
up the requests behind it: a later one that can start passes it. Every request passed counts the pass, and
one passed `max_passes` times is passed no more: nothing behind it starts until it has (bounded overtaking,
so no request starves). Passes are counted, not steps waited: a request that waits for a long running one to
give its blocks back would wait thousands of steps under strict FIFO too, and a limit on steps would close
the queue behind it without anything having harmed it; what can delay it past FIFO's wait is requests that
passed it holding blocks it needs, each pass one of them, so its extra wait is at most the lifetimes (prompt
+ max_tokens each) of max_passes requests. The engine allows 2 x max_batch: two batches of later requests
may run beside a blocked long request before the queue waits for it.

A step looks at most LOOKAHEAD requests into the queue past those it admits (bounded work per step).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Callable

from millis.gen.request import Request

LOOKAHEAD = 64  # waiting requests a step tries and leaves waiting, at most


@dataclass(frozen=True)
class Chunk:
    """Positions [start, end) of request r's feed (its prompt; after a preemption prompt + output), prefilled
    this step."""

    r: Request
    start: int
    end: int

    @property
    def last(self) -> bool:  # it ends the prompt: its last position's logits give the first token
        return self.end == len(self.r.feed)


def schedule(slots: list, waiting: deque, budget: int, max_new: int, max_passes: int,
             start: Callable[[Request], bool], need: Callable[[Request], int] | None = None) -> list[Chunk]:
    """This step's prefill chunks, at most `budget` prompt tokens in all: the prompts part-way prefilled
    continue (within half the budget while a request waits for a free slot), then waiting requests start in
    queue order while budget, a free slot and `max_new` allow, then the part-way prompts take what is left.
    `start(r)`: True when r took a free slot and its resources (then it leaves the queue), False when it
    must wait (then later requests may pass it, up to max_passes times). `need(r)`: the prompt tokens r would
    prefill if it started now (its feed less what the prefix cache holds; default: its whole feed)."""
    need = need or (lambda r: len(r.feed) - r.prefilled)
    chunks: list[Chunk] = []
    left = budget
    reserve = budget // 2 if waiting and max_new > 0 and None in slots else 0  # for short waiting prompts

    def take(r: Request, most: int) -> None:
        nonlocal left
        chunks.append(Chunk(r, r.prefilled, min(len(r.feed), r.prefilled + most)))
        left -= chunks[-1].end - chunks[-1].start

    for r in slots:
        if left > reserve and r is not None and r.prefilling:
            take(r, left - reserve)
    partway = len(chunks)
    new, room = 0, max_passes  # room: passes the requests left waiting so far may still take: the fewest of theirs

    def admit(capped: bool) -> None:
        """Waiting requests into free slots, in queue order; capped: a part-way prompt wanted more, so a new one
        must be prefilled whole in what is left, and a longer one keeps a free slot for itself (it could start
        now: a short one behind it must not take the slot it would start in when the part-way prompt ends)."""
        nonlocal new, room
        i = held = 0  # held: free slots kept for the requests skipped for the cap alone
        while room > 0 and left and new < max_new and slots.count(None) > held and i < min(len(waiting), LOOKAHEAD):
            r = waiting[i]
            fits = not capped or need(r) <= left
            if fits and start(r):
                del waiting[i]
                for q in islice(waiting, i):  # the requests it passed
                    q.passed += 1
                room -= 1 if i else 0
                take(r, left)
                new += 1
            else:  # one passed max_passes times already: the requests behind it wait until it starts
                held += not fits
                room = min(room, max_passes - r.passed)
                i += 1

    capped = any(not c.last for c in chunks)
    admit(capped)
    for j in range(partway):  # what the new prompts left
        c = chunks[j]
        more = min(len(c.r.feed) - c.end, left)
        chunks[j], left = Chunk(c.r, c.start, c.end + more), left - more
    if capped and left and all(c.last for c in chunks[:partway]):  # that ended the part-way prompts after all: the
        admit(False)  # rest starts the next in line as before (a long one part-way), not left unused
    return chunks

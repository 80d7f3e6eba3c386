"""The generation engine: continuous batching over a static KV cache, one `step()` at a time.

    eng = open_engine(path, EngineConfig(max_batch=8))                   # millis.gen.open_engine
    rid = eng.add("Once upon a time", SamplingParams(max_tokens=40))   # or a list of token ids
    while eng.has_work:
        for out in eng.step():          # StepOutput(id, token_ids, text, finished)
            print(out.text, end="")     # finished: None, "stop" (EOS or stop string), "length"
    eng.cancel(rid)                     # frees the request's slot at once; False if unknown / done

Each of the `max_batch` slots is one KV cache row. `step()` is schedule, execute, update:
- schedule (`scheduling.py`): at most `prefill_tokens` prompt tokens a step, all requests together: a prompt
  part-way prefilled continues (within half the budget while a request waits for a free slot), then waiting
  requests take free slots (FIFO, but one that fits may pass a request that does not, a bounded number of
  times; at most `max_prefills_per_step` a step);
- execute: the step's prompt chunks are prefilled (native: each alone; torch: whole prompts in one
  right-padded forward, or a lone one from a CUDA graph of its token bucket, cuda_prefill.GraphedPrefill), every
  running request decodes one token, all rows in one batched forward at their own positions; the logits
  of the running rows and of the prompts whose last chunk ran are sampled together;
- update: the step's one host sync reads the tokens back; EOS, stop strings, max tokens, a complete
  grammar and a full slot end a request, and its slot is free for the next step.
CUDA (`cuda_graph.GraphedDecode`, a graph per batch bucket): running requests keep the lowest slots.
Native models: a prompt prefills only past its prefix cached in the paged KV (`models/paged_kv.py`), whose
blocks a request takes as it writes positions (the latest to arrive is preempted when the pool is full: `_make_room`);
greedy rows may verify a draft (prompt lookup, `speculate.py`, or a draft model, `draft_model.py`). A row with a
grammar (`grammar.py`) samples only what the grammar allows.

One request never fails another: whatever one request raises in a step (its prefill, decode row, sampling,
grammar or text) ends that request alone with `finished="error"` and the reason in `StepOutput.error`; when a
batched call raises, its rows are retried one at a time to find which. The work of a step is bounded by the
batch and `prefill_tokens` (a long prompt takes several steps, with no output until its last chunk): stop
strings are searched only in the new text, the hold-back check in the last len(stop) - 1 characters (`stops.py`).

A request's tokens do not depend on what else is in the batch: in fp32, greedy rows give the same tokens as
alone (tested against HF `generate`), and a seeded row draws from its own stream. This holds for
`quant=int8` (exact integer sums per 32 values of a row), not for `int8-torch` (fbgemm).

Thread use: `add` and `cancel` from any thread, also while a step runs (they never wait for the
model); `step` from one thread at a time (a server's one worker thread runs the step loop).
"""
from __future__ import annotations

import itertools
import threading
from collections import deque

import torch

from millis.common.errors import MillisError
from millis.gen.chunked_prefill import prefill_chunks
from millis.gen.config import PREFILL_TOKENS, SamplingParams
from millis.gen.cuda_graph import compact_slots
from millis.gen.models.layers import make_batch
from millis.gen.grammar import GrammarFailed, allow_only
from millis.gen.load import Loaded
from millis.gen.request import Request, StepOutput, checked_prompt
from millis.gen.rows import isolated, per_row_on_error, reason
from millis.gen.sampling import SlotPenalties, ranked
from millis.gen.scheduling import Chunk, schedule
from millis.gen.speculate import DraftStats, draftable, row_drafts, verify
from millis.gen.stops import held_back, new_text  # noqa: F401 -- held_back: re-exported


class Engine:
    def __init__(self, loaded: Loaded, max_prefills_per_step: int = 4, seed: int = 0, decode=None,
                 speculate: int = 0, drafter=None, prefill=None, prefill_tokens: int = PREFILL_TOKENS["cpu"]) -> None:
        """`decode`: optional (tokens, positions, slots) -> logits (n, vocab) for the decode rows,
        e.g. `millis.gen.cuda_graph.GraphedDecode`; default: one eager forward over those rows.
        `prefill`: optional (prompt, slot) -> logits (1, vocab) or None, for a step's lone whole prompt
        (`millis.gen.cuda_prefill.GraphedPrefill`); None from it, or no `prefill`: one eager forward.
        `speculate`: draft tokens per step for greedy rows of native models (0 = off), from prompt lookup
        or from `drafter` (a draft_model.DraftModel). `prefill_tokens`: prompt tokens a step prefills."""
        self.model, self.tok, self.max_seq = loaded.model, loaded.tokenizer, loaded.max_seq
        self.decode, self.prefill, self.config = decode, prefill, loaded.config
        self.end_ids = self.config.end_ids  # ids that end generation (every token checks)
        self.max_batch, self.device = loaded.max_batch, torch.device(loaded.device)
        self.kv = loaded.kv  # paged KV (native models): admission reserves a request's positions
        self.chat_template, self.special_tokens = loaded.chat_template, loaded.special_tokens
        self.tool_template = loaded.tool_template  # GGUF's tool_use template, where it has one
        self.source_path = loaded.source_path  # where the model came from (its HF dir holds a chat template)
        self.max_prefills, self.speculate = max_prefills_per_step, speculate
        self.prefill_tokens, self.max_passes = prefill_tokens, 2 * self.max_batch  # scheduling.py
        self.draft_stats = DraftStats()  # all requests' drafts: verified and accepted tokens
        self.drafter = drafter
        self.window = getattr(self.config, "sliding_window", 0)
        self.slots: list[Request | None] = [None] * self.max_batch
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.penalties = SlotPenalties(self.max_batch, self.config.vocab_size, self.device)
        self._ids = itertools.count()
        self._arrivals, self.preempted = itertools.count(), 0  # Request.arrived; preemptions (`_make_room`)
        self._seeds = torch.Generator().manual_seed(seed)  # seeds of requests that bring none
        self._lock = threading.Lock()  # guards waiting, requests and slots
        self._stepping = False         # a step is running: cancel leaves slot freeing to it
        self._grammars = None          # grammar.Grammars, built at the first constrained request
        self._grammar_lock = threading.Lock()

    # ------------------------------------------------------------------ API
    def add(self, prompt: str | list[int], params: SamplingParams = SamplingParams(), id: str | None = None,
            matcher=None) -> str:
        """Queue a request; returns its id. Raises MillisError for input it could never run. `matcher`: its
        grammar's, compiled by the caller (a server compiles off its event loop), else compiled here."""
        ids = checked_prompt(prompt, params, self.tok, self.config.vocab_size, self.max_seq,
                             self.kv.capacity if self.kv is not None else 0)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        if matcher is None and params.grammar:
            matcher = self.grammars.matcher(params.grammar)
        with self._lock:
            rid = id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise MillisError(f"request id {rid!r} is already in use")
            r = Request(rid, ids, params, seed, matcher=matcher, arrived=next(self._arrivals))
            self.requests[rid] = r
            self.waiting.append(r)
        return rid

    def cancel(self, rid: str) -> bool:
        """Drop a request, waiting or running; its slot is free at once (or, while a step is
        running, when that step ends, which then reports nothing for it). False if unknown or done."""
        with self._lock:
            r = self.requests.pop(rid, None)
            if r is None:
                return False
            if r.slot < 0:
                self.waiting.remove(r)
            elif not self._stepping:
                self._free(r.slot)
            return True

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits (T, vocab) fp32 of every position of `ids` (a fresh sequence from position 0), on a
        free slot: what perplexity and log-probabilities read. Not concurrently with `step()`."""
        if not ids or len(ids) > self.max_seq or min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise MillisError(f"need 1..{self.max_seq} token ids in 0..{self.config.vocab_size - 1}")
        with self._lock:
            if None not in self.slots:
                raise MillisError("no free slot: logits() needs one (wait for running requests)")
            slot = self.slots.index(None)
            if self.kv is not None and not self.kv.reserve(slot, len(ids)):
                raise MillisError(f"{len(ids)} positions do not fit the KV cache now (raise --kv-memory-mb)")
            self.slots[slot] = Request("logits", list(ids), SamplingParams(), 0, slot)
        try:
            b = make_batch([list(ids)], [0], [slot], self.window, last_only=False, device=self.device)
            return self.model(b)[0].float()
        finally:
            with self._lock:
                self._free(slot)

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(T - 1,) log p(ids[t] | ids[:t]) for t >= 1."""
        lp = torch.log_softmax(self.logits(ids)[:-1], dim=-1)
        return lp.gather(-1, torch.tensor(ids[1:], device=lp.device)[:, None]).squeeze(-1)

    @property
    def grammars(self):
        """The engine's grammar.Grammars (llguidance's view of the tokenizer; built once, ~0.5 s)."""
        with self._grammar_lock:  # not the engine's lock: steps and adds go on while it is built
            if self._grammars is None:
                from millis.gen.grammar import Grammars

                self._grammars = Grammars(self.tok, self.config.vocab_size, self.config.eos_id, self.end_ids)
            return self._grammars

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Schedule, execute, update. The lock is not held while the model runs: `add` and `cancel`
        from other threads wait only for the bookkeeping."""
        with self._lock:
            chunks, running = self._schedule()
            self._stepping = True
        tokens: dict[str, list[int]] = {}
        failed: dict[str, str] = {}
        rows = [c.r for c in chunks] + running
        try:
            tokens = self._execute(chunks, running, failed)
        except Exception as e:  # noqa: BLE001 -- outside any one request's part (a bug): end the step's rows
            failed.update({r.id: f"{type(e).__name__}: {e}" for r in rows if r.id not in failed})
        finally:
            with self._lock:
                self._stepping = False
                outs = self._update(rows, tokens, failed)
                for i, r in enumerate(self.slots):  # cancelled while the step ran: free now
                    if r is not None and self.requests.get(r.id) is not r:  # by object: add() may reuse the id
                        self._free(i)
        return outs

    def _schedule(self) -> tuple[list[Chunk], list[Request]]:
        if self.kv is not None:
            self._make_room()
        running = [r for r in self.slots if r is not None and not r.prefilling]  # decode rows: their feeds are in
        coming = {k for r in self.slots if r is not None and r.prefilling for k in r.keys or ()}  # being prefilled
        # the budget holds with no row decoding too: a step stays bounded and a cancelled prompt stops within a
        # chunk (an idle server's 8k-token prompt was one 100 s step no cancel could end)
        chunks = schedule(self.slots, self.waiting, self.prefill_tokens, self.max_prefills, self.max_passes,
                          lambda r: self._admit(r, coming), self._to_prefill)
        if self.kv is None and hasattr(self.decode, "move_slot"):  # a graph per batch bucket: keep the low slots
            compact_slots(self.slots, self.decode.move_slot, self.penalties.move)
        return chunks, running

    def _to_prefill(self, r: Request) -> int:
        """The prompt tokens a waiting request would prefill if it started now (its feed less its cached prefix)."""
        if self.kv is None:
            return len(r.feed)
        r.keys = self.kv.keys(r.feed) if r.keys is None else r.keys  # hashed once (as _admit)
        return len(r.feed) - self.kv.cached_prefix(r.feed, r.keys)

    def _admit(self, r: Request, coming: set) -> bool:
        """r into the lowest free slot, promised the KV of its feed + a block (grown: `_make_room`); False: wait."""
        slot = self.slots.index(None)
        if self.kv is not None:
            feed = r.feed
            r.keys = self.kv.keys(feed) if r.keys is None else r.keys  # hashed once: a waiting request retries
            if self.kv.next_uncached(feed, r.keys) in coming:
                return False  # its prefix is being prefilled (n choices, a shared system prompt): shared once written
            cached = self.kv.admit(slot, min(len(feed) + self.kv.block_size, self._limit(r)), feed, r.keys,
                                   count=not r.preempted)  # the prefix cache's hit rate: prompts once
            if cached is None:
                return False  # not until running requests give their KV blocks back
            r.cached = r.prefilled = cached
            coming.update(r.keys)
            if self.drafter is not None and draftable(r.params, r.drafts):  # sampled, grammar, logprobs: never
                self.drafter.admit(slot, self._limit(r))  # no drafts while its cache is full
        r.slot, self.slots[slot] = slot, r
        self.penalties.admit(slot, r.prompt, r.params, r.out)
        return True

    def _make_room(self) -> None:
        """Each decoding row's KV promise grows to the position this step writes (a draft's grows once the row has
        one, after admissions: `speculate.row_drafts`). Where it cannot, the latest to arrive gives its blocks back
        and waits first in line (vLLM's recompute: it returns with its prompt + output prefilled and goes on)."""
        rows = sorted((q for q in self.slots if q is not None and not q.prefilling), key=lambda q: q.arrived)
        for r in rows:  # positions once this step's token is written
            while r.slot >= 0 and not self.kv.grow(r.slot, min(len(r.prompt) + len(r.out), self._limit(r))):
                self._preempt(max((q for q in self.slots if q is not None), key=lambda q: q.arrived))

    def _preempt(self, r: Request) -> None:
        self._free(r.slot)
        r.slot, r.prefilled, r.cached, r.keys, r.resumed = -1, 0, 0, None, r.prompt + r.out if r.out else None
        self.waiting.appendleft(r)
        r.preempted, self.preempted = r.preempted + 1, self.preempted + 1

    def _execute(self, chunks: list[Chunk], running: list[Request], failed: dict[str, str]) -> dict[str, list[int]]:
        """Logits of every row, then one batched sample: {request id: its new tokens} (one, or a verified
        draft's several). A request whose part raises lands in `failed` (id -> reason), the others go on."""
        rows, logits = prefill_chunks(self.model, chunks, failed, self.kv, self.prefill, self.window, self.device)
        tokens: dict[str, list[int]] = {}
        drafts = self._drafts(running, failed) if self.speculate else []
        decoded: list[Request] = []  # the rows of this step's decode calls
        if any(d for _, d in drafts):  # one forward: rows with a draft verify it, the others get logits
            rd = [(r, d or []) for r, d in drafts if r.id not in failed]
            run = lambda items: verify(self.model, [(r.out[-1], r.n_cached, r.slot, d) for r, d in items])  # noqa: E731
            for part, res in per_row_on_error(rd, run, failed, key=lambda x: x[0].id):
                for (r, d), x in zip(part, res):
                    if not d:  # no draft: its next-token logits, sampled below with the rest
                        rows.append(r)
                        logits.append(torch.from_numpy(x)[None])
                        continue
                    for st in (r.drafts, self.draft_stats):
                        st.record(len(d), len(x) - 1)
                    tokens[r.id] = x
        elif running:  # decode: one token per running row, each at its own position, one batched forward
            for part, out in per_row_on_error([r for r in running if r.id not in failed], self._decode, failed):
                rows += part
                decoded += part
                logits.append(out)
        if not rows:
            return tokens
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)  # one part: no copy of (B, V)
        # logprobs: the model's own distribution, before a grammar's mask, temperature, top-k/p and penalties
        want = [i for i, r in enumerate(rows) if r.params.logprobs >= 0]
        lp = torch.log_softmax(logits[want].float(), -1).cpu() if want else None
        for i, r in enumerate(rows):  # constrained rows: only what their grammar allows next
            if r.matcher is not None:
                isolated(failed, r, lambda i=i, r=r: allow_only(r.matcher, logits[i]))

        def sample_rows(idx: list[int]) -> torch.Tensor:  # a row retried alone draws the same: (seed, drawn)
            return self._sample(rows, logits) if len(idx) == len(rows) else self._sample([rows[i] for i in idx],
                                                                                       logits[idx])

        for part, tok in per_row_on_error(list(range(len(rows))), sample_rows, failed, key=lambda i: rows[i].id):
            for i, t in zip(part, tok.tolist()):  # the step's one host sync
                tokens[rows[i].id] = [t]
        if decoded and getattr(self.decode, "failed_step", None) and self.decode.failed_step():
            for r in decoded:  # NaN logits and NaN in its KV cache: an error, not a token drawn from them
                tokens.pop(r.id, None)
                failed[r.id] = "RuntimeError: a grid barrier of the GPU layer kernel gave up at this step"
        for j, i in enumerate(want):
            if (r := rows[i]).id in tokens:
                t = tokens[r.id][0]
                r.lp = ((t, float(lp[j, t]), ranked(lp[j], r.params.logprobs)),)
        return tokens

    def _drafts(self, running: list[Request], failed: dict[str, str]) -> list[tuple[Request, list[int]]]:
        """(request, draft tokens) per running row, their KV promised as they come (`speculate.row_drafts`)."""
        return row_drafts(running, failed, self.kv, self.drafter, self.speculate, self._limit)

    def _decode(self, rows: list[Request]) -> torch.Tensor:
        if self.decode is not None:
            return self.decode([r.out[-1] for r in rows], [r.n_cached for r in rows], [r.slot for r in rows])
        b = make_batch([[r.out[-1]] for r in rows], [r.n_cached for r in rows], [r.slot for r in rows],
                       self.window, device=self.device)
        return self.model(b)[:, -1]

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        return self.penalties.sample(logits, [r.slot for r in rows], [r.params for r in rows],
                                     [r.seed for r in rows], [len(r.out) for r in rows])

    def _update(self, rows: list[Request], tokens: dict[str, int], failed: dict[str, str]) -> list[StepOutput]:
        outs = []
        for r in rows:
            if self.requests.get(r.id) is not r:  # cancelled during the step (its id maybe reused): nothing to report
                continue
            if r.prefilling and r.id not in failed:  # its feed part-way in: no token yet
                continue
            if r.id in tokens and r.id not in failed:
                try:
                    outs.append(self._advance_all(r, tokens[r.id]))
                    continue
                except Exception as e:  # noqa: BLE001 -- this request's text failed: end it alone
                    failed[r.id] = reason(e)
            outs.append(StepOutput(r.id, [], "", "error", failed[r.id]))  # no token: it failed (step fills failed)
            self._finish(r)
        return outs

    def _advance_all(self, r: Request, toks: list[int]) -> StepOutput:
        outs = []
        for t in toks:  # a verified draft brings several tokens: each one checked, until the request ends
            outs.append(self._advance(r, t))
            if outs[-1].finished:
                break
        if len(outs) == 1:
            return outs[0]
        return StepOutput(r.id, [t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                          outs[-1].finished, logprobs=sum((o.logprobs for o in outs), ()))

    def _advance(self, r: Request, t: int) -> StepOutput:
        r.out.append(t)
        p = r.params
        finished = None
        if r.matcher is not None and not r.matcher.consume_token(t):
            raise GrammarFailed(f"token {t} broke the request's grammar: {r.matcher.get_error()}")
        if t in self.end_ids and not p.ignore_eos or r.matcher is not None and r.matcher.is_stopped():
            finished = "stop"  # EOS, or the grammar is complete (nothing may follow)
        elif len(r.out) >= p.max_tokens or len(r.prompt) + len(r.out) >= self._limit(r):
            finished = "length"
        text, stopped = new_text(self.tok, self.end_ids, r, finished is not None)
        finished = "stop" if stopped else finished
        if finished:
            self._finish(r)
        out = StepOutput(r.id, [t], text, finished, logprobs=r.lp)
        r.lp = ()
        return out

    def _limit(self, r: Request) -> int:
        """Most positions `r` may fill: its prompt + max_tokens, within the context and the KV pool."""
        n = min(len(r.prompt) + r.params.max_tokens, self.max_seq)
        return min(n, self.kv.capacity) if self.kv is not None else n

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        if self.kv is not None:
            self.kv.release(slot)
        if self.drafter is not None:
            self.drafter.release(slot)

    def _finish(self, r: Request) -> None:
        if r.slot >= 0 and self.slots[r.slot] is r:
            self._free(r.slot)
        if self.requests.get(r.id) is r:  # not a new request that took this cancelled one's id
            del self.requests[r.id]


def run_all(eng: Engine, prompts: list, params: SamplingParams) -> list[list[int]]:
    """Add every prompt, step until all are done; each prompt's new token ids, in prompt order."""
    ids = [eng.add(p, params) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id] += o.token_ids
    return [got[i] for i in ids]

"""The generation engine: continuous batching over a static KV cache, one `step()` at a time.

    eng = open_engine(path, EngineConfig(max_batch=8))                   # millis.gen.open_engine
    rid = eng.add("Once upon a time", SamplingParams(max_tokens=40))   # or a list of token ids
    while eng.has_work:
        for out in eng.step():          # StepOutput(id, token_ids, text, finished)
            print(out.text, end="")     # finished: None, "stop" (EOS or stop string), "length"
    eng.cancel(rid)                     # frees the request's slot at once; False if unknown / done

Each of the `max_batch` slots is one KV cache row. `step()` is schedule, execute, update:

- schedule: waiting requests take free slots (FIFO, at most `max_prefills_per_step` per step);
- execute: each new request is prefilled alone (B=1, its whole prompt), and every request that was
  already running decodes one token, all rows in one batched forward at their own positions; then
  all their logits are sampled together on the device;
- update: the step's one host sync reads the tokens back; EOS, stop strings, max tokens and a full
  slot end a request, and its slot is free for the next step.

A request's tokens do not depend on what else is in the batch: in fp32, greedy rows give the same
tokens as alone (tested against HF `generate`), and a seeded row draws from its own generator.
(With `quant=int8` the activations' int8 scale is per call, so shared by the batch's rows.)

Thread use: `add` and `cancel` may be called from any thread, also while a step runs (they do not
wait for the model); `step` from one thread at a time (an HTTP server runs the step loop in one
worker thread and streams each StepOutput to its client).
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from millis.errors import MillisError
from millis.gen.config import SamplingParams
from millis.gen.layers import make_batch
from millis.gen.load import Loaded
from millis.gen.sampling import RowParams, sample
from millis.gen.tokenizer import text_delta

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class StepOutput:
    id: str
    token_ids: list[int]   # the tokens this step produced for the request (EOS included when it came)
    text: str              # the text they add (held back while it could still be the start of a stop string)
    finished: str | None   # None while running; "stop" (EOS or stop string) or "length"


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    slot: int = -1
    out: list[int] = field(default_factory=list)
    emitted: str = ""      # text already handed out
    anchor: int = 0        # out[:anchor] is final text (`anchor_text`): only what follows is decoded
    anchor_text: str = ""

    @property
    def n_cached(self) -> int:  # positions of the slot written: all but the last sampled token
        return len(self.prompt) + len(self.out) - 1


class Engine:
    def __init__(self, loaded: Loaded, max_prefills_per_step: int = 4, seed: int = 0, decode=None) -> None:
        """`decode`: optional (tokens, positions, slots) -> logits (n, vocab) for the decode rows,
        e.g. `millis.gen.cuda_graph.GraphedDecode`; default: one eager forward over those rows."""
        self.model, self.tok, self.max_seq = loaded.model, loaded.tokenizer, loaded.max_seq
        self.decode = decode
        self.config = loaded.config
        cache = next(m.cache for m in self.model.modules() if getattr(m, "cache", None) is not None)
        self.max_batch, self.device = cache.k.shape[0], cache.k.device
        self.max_prefills = max_prefills_per_step
        self.window = getattr(self.config, "sliding_window", 0)
        self.slots: list[_Request | None] = [None] * self.max_batch
        self.waiting: deque[_Request] = deque()
        self.requests: dict[str, _Request] = {}
        self.seen = torch.zeros(self.max_batch, self.config.vocab_size, dtype=torch.bool, device=self.device)
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(seed)  # seeds of requests that bring none
        self._lock = threading.Lock()  # guards waiting, requests and slots
        self._stepping = False         # a step is running: cancel leaves slot freeing to it

    # ------------------------------------------------------------------ API
    def add(self, prompt: str | list[int], params: SamplingParams = SamplingParams(), id: str | None = None) -> str:
        """Queue a request; returns its id. Raises MillisError for input it could never run."""
        if isinstance(prompt, str):
            if self.tok is None:
                raise MillisError("this model has no tokenizer (tokenizer.json): give the prompt as token ids")
            ids = self.tok.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise MillisError("the prompt is empty")
        if len(ids) >= self.max_seq:
            raise MillisError(f"the prompt has {len(ids)} tokens; this engine holds at most {self.max_seq} "
                              f"positions per request (prompt + output), so at most {self.max_seq - 1}")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise MillisError(f"prompt token ids must be in 0..{self.config.vocab_size - 1}")
        if params.stop and self.tok is None:
            raise MillisError("stop strings need a tokenizer; this model has none")
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with self._lock:
            rid = id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise MillisError(f"request id {rid!r} is already in use")
            r = _Request(rid, ids, params, gen)
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
                self.slots[r.slot] = None
            return True

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
            new, running = self._schedule()
            self._stepping = True
        tokens: list[int] = []
        try:
            tokens = self._execute(new, running)
        finally:
            with self._lock:
                self._stepping = False
                outs = self._update(new + running, tokens)
                for i, r in enumerate(self.slots):  # cancelled while the step ran: free now
                    if r is not None and r.id not in self.requests:
                        self.slots[i] = None
        return outs

    def _schedule(self) -> tuple[list[_Request], list[_Request]]:
        running = [r for r in self.slots if r is not None]
        new = []
        while self.waiting and len(new) < self.max_prefills and None in self.slots:
            r = self.waiting.popleft()
            r.slot = self.slots.index(None)
            self.slots[r.slot] = r
            self.seen[r.slot] = False
            self.seen[r.slot, torch.tensor(r.prompt, device=self.device)] = True
            new.append(r)
        return new, running

    def _execute(self, new: list[_Request], running: list[_Request]) -> list[int]:
        logits = []
        for r in new:  # prefill: the whole prompt of one request, logits of its last position
            logits.append(self.model(make_batch([r.prompt], [0], [r.slot], self.window, device=self.device))[:, -1])
        if running and self.decode is not None:
            logits.append(self.decode([r.out[-1] for r in running], [r.n_cached for r in running],
                                      [r.slot for r in running]))
        elif running:  # decode: one token per running row, each at its own position
            b = make_batch([[r.out[-1]] for r in running], [r.n_cached for r in running],
                           [r.slot for r in running], self.window, device=self.device)
            logits.append(self.model(b)[:, -1])
        if not logits:
            return []
        rows = new + running
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        penalized = any(r.params.repetition_penalty != 1.0 for r in rows)
        tok = sample(torch.cat(logits), RowParams([r.params for r in rows], [r.generator for r in rows],
                                                  self.seen[slots] if penalized else None))
        self.seen[slots, tok] = True
        return tok.tolist()  # the step's one host sync

    def _update(self, rows: list[_Request], tokens: list[int]) -> list[StepOutput]:
        outs = []
        for r, t in zip(rows, tokens):
            if r.id not in self.requests:  # cancelled during the step: nothing to report
                continue
            r.out.append(t)
            p = r.params
            finished = None
            if t == self.config.eos_id and not p.ignore_eos:
                finished = "stop"
            elif len(r.out) >= p.max_tokens or len(r.prompt) + len(r.out) >= self.max_seq:
                finished = "length"
            text, stopped = self._text(r, finished is not None)
            finished = "stop" if stopped else finished
            outs.append(StepOutput(r.id, [t], text, finished))
            if finished:
                self.slots[r.slot] = None
                self.requests.pop(r.id, None)
        return outs

    def _text(self, r: _Request, final: bool) -> tuple[str, bool]:
        """The new text of `r` and whether a stop string ended it."""
        if self.tok is None:
            return "", False
        ids = r.out[:-1] if r.out[-1] == self.config.eos_id and not r.params.ignore_eos else r.out
        context = (r.prompt + ids[:r.anchor])[-4:]  # a few ids before: SentencePiece spaces need them
        full = r.anchor_text + text_delta(self.tok, context, ids[r.anchor:])
        stopped = False
        cut = min((i for i in (full.find(s) for s in r.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, stopped, final = full[:cut], True, True
        whole = full
        if not final:
            full = full.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its next bytes
            hold = max((n for s in r.params.stop for n in range(1, len(s)) if full.endswith(s[:n])), default=0)
            full = full[:len(full) - hold]
        if not full.startswith(r.emitted):
            return "", stopped
        new, r.emitted = full[len(r.emitted):], full
        if len(ids) - r.anchor >= 16 and full == whole and not final:  # nothing held back: ids so far are final
            r.anchor, r.anchor_text = len(ids), full  # decode cost per step stays flat
        return new, stopped


def run_all(eng: Engine, prompts: list, params: SamplingParams) -> list[list[int]]:
    """Add every prompt, step until all are done; each prompt's new token ids, in prompt order."""
    ids = [eng.add(p, params) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id] += o.token_ids
    return [got[i] for i in ids]

"""A new prompt's prefill replayed from a CUDA graph per token bucket (batch 1), beside GraphedDecode.

The first H200 run timed a 512-token prompt's first token at 13.5 ms on the Llama-3.2-1B shape and 17.3
on SmolLM2-135M: an eager forward launches ~40 small kernels a layer from Python, and at these sizes the
launches, not the ~2 ms of arithmetic, set the time. Here the prompt is right-padded with token 0 to the
smallest bucket that holds it (64, 128, ... up to 2048 or max_seq) and the bucket's graph is replayed:
static shapes, launch gaps gone. As in the engine's padded prefill (`layers.padded_batch`) attention is
causal, so no real token sees the padding; the padding's cache writes land past the prompt in the
request's own slot, where its decode writes each position before it reads it. Logits are taken at the
prompt's last token (`Batch.last`, a device tensor the host fills) and copied out of the graphs' pool.

A graph serves a step that prefills one whole prompt alone. A prompt longer than the step's prefill budget
(EngineConfig.prefill_tokens, on cuda LARGEST unless set) is prefilled in chunks over several steps, eagerly
(its later chunks start past position 0); buckets stop at the budget, as a longer prompt never comes whole.
Prompts longer than the largest bucket, and steps that prefill several prompts at once (one right-padded
eager forward: many short prompts in one launch sequence beat a replay each), take the eager path.
`capture=False` runs the same static-shape forward eagerly on any device: the CPU stand-in the tests
compare with the engine's own prefill. MILLIS_NO_PREFILL_GRAPHS=1 turns it off (the A/B switch).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from millis.common.errors import MillisError
from millis.gen.models.layers import Batch, visible_keys
from millis.gpu.graph_timing import context_usable
from millis.common.config import env_switch

SMALLEST, LARGEST = 64, 2048  # below 64 tokens a replay saves little; above 2048 the arithmetic dominates


def prefill_buckets(max_seq: int, smallest: int = SMALLEST, largest: int = LARGEST) -> tuple[int, ...]:
    """Powers of two from `smallest` up to min(largest, max_seq): the padding writes the cache up to the
    bucket's length, which must stay inside the slot."""
    out, n = [], smallest
    while n <= min(largest, max_seq):
        out.append(n)
        n *= 2
    return tuple(out)


def wanted() -> bool:
    return not env_switch("MILLIS_NO_PREFILL_GRAPHS")


def open_prefill(model: nn.Module, max_seq: int, budget: int = LARGEST) -> "GraphedPrefill | None":
    """The engine's prefill graphs, or None (with a warning) where capture fails on this GPU / torch: prefills
    then run eagerly, as before the graphs, rather than the engine failing to open. A failure that left the
    CUDA context unusable (a kernel fault) is raised: no fallback can help. `budget`: the engine's prompt tokens
    a step (no bucket past it)."""
    try:
        return GraphedPrefill(model, max_seq, buckets=prefill_buckets(max_seq, largest=min(LARGEST, budget)))
    except Exception as e:  # noqa: BLE001
        if not context_usable():
            raise
        warnings.warn(f"prefill graphs unavailable ({type(e).__name__}: {str(e)[:300]}); prefilling eagerly")
        return None


class GraphedPrefill:
    """Callable (prompt ids, slot) -> logits (1, vocab) fp32 at the prompt's last token, or None when the
    prompt is longer than every bucket (the caller prefills it eagerly)."""

    def __init__(self, model: nn.Module, max_seq: int, capture: bool = True,
                 buckets: tuple[int, ...] | None = None) -> None:
        dev = next(model.parameters()).device
        if capture and dev.type != "cuda":
            raise MillisError("CUDA graphs need the model on a CUDA device")
        self.model, self.device = model, dev
        self.buckets = tuple(sorted(buckets if buckets is not None else prefill_buckets(max_seq)))
        if any(t > max_seq for t in self.buckets):
            raise MillisError(f"prefill buckets {self.buckets} reach past the cache's {max_seq} positions")
        window = getattr(model.config, "sliding_window", 0)
        self.ids = {t: torch.zeros(1, t, dtype=torch.long, device=dev) for t in self.buckets}   # (1, T)
        self.last = {t: torch.zeros(1, dtype=torch.long, device=dev) for t in self.buckets}     # (1,)
        self.slot = {t: torch.zeros(1, dtype=torch.long, device=dev) for t in self.buckets}     # (1,)
        self.pos = {t: torch.arange(t, device=dev)[None] for t in self.buckets}                 # (1, T), fixed
        # causal from position 0; a sliding window shorter than the bucket masks explicitly (static too)
        self.mask = {t: visible_keys(self.pos[t], t, window) if window and t > window else None
                     for t in self.buckets}
        self.out: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        if capture:
            for t in reversed(self.buckets):  # largest first: the smaller ones fit in its pool
                self._capture(t)

    def _forward(self, t: int) -> torch.Tensor:
        mask = self.mask[t]
        batch = Batch(ids=self.ids[t], pos=self.pos[t], slots=self.slot[t], kv_len=t, mask=mask, rows=None,
                      last_only=True, causal=mask is None, last=self.last[t])
        return self.model(batch)[:, -1]                                         # (1, vocab)

    @torch.inference_mode()
    def _capture(self, t: int) -> None:
        # warm-up and capture prefill slot 0 with token 0: whatever they write there, a request admitted to
        # slot 0 overwrites from position 0 before it reads (the same argument as the padding's writes)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy inits and cuBLAS workspaces outside the graph
                self._forward(t)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self.out[t] = self._forward(t)
        self.graphs[t] = g

    @torch.inference_mode()
    def __call__(self, prompt: list[int], slot: int) -> torch.Tensor | None:
        n = len(prompt)
        t = next((b for b in self.buckets if b >= n), None)
        if t is None or n == 0:
            return None
        ids = torch.zeros(1, t, dtype=torch.long)
        ids[0, :n] = torch.tensor(prompt)
        self.ids[t].copy_(ids, non_blocking=True)
        self.last[t].fill_(n - 1)
        self.slot[t].fill_(slot)
        if t in self.graphs:
            self.graphs[t].replay()
            self.replays += 1
            return self.out[t].clone()  # out of the pool before another replay reuses it
        return self._forward(t)

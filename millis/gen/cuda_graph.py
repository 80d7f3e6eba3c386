"""Static-shape decode, captured as one CUDA graph per (batch bucket, KV-length bucket), gpt-fast style.
First run on a GPU on 2026-12-04 (an H200: docs/gpu.md); eagerly on CPU in the tests.

The decode step of bucket (B, L) feeds slots 0..B-1 and attends over their first L positions (a view
of the static cache, no copy), so its shapes never change and the forward is replayed from a graph:
the host copies B token ids and positions into the static inputs and replays. L is the smallest KV
bucket holding every row's position, so a step attends over the live length rounded up to a power
of two, not over the whole cache. The mask is computed inside the graph from the positions by the
engine's own rule (`visible_keys`, with the model's sliding window). Rows of the bucket with no running
request are fed token 0 at position max_seq - 1, a scratch position no request reaches (a request
ends when prompt + output reach max_seq, so it writes at most position max_seq - 2); the scratch
write lands past L, where no row of the step looks, and an idle row sees every key of the step (with
a sliding window it would see none: an all-masked row gives NaN, which its slot would keep).

The bucket follows the highest running slot, so the engine keeps running requests in the lowest slots:
when a request ends below others, `compact_slots` moves the highest one down into the hole with its KV
row (`move_slot`: one copy of the row's live positions per layer). One request left in slot 31 would
otherwise replay the 32-row graph.

All graphs share one memory pool (vLLM's practice): they replay one at a time, and a step's logits are
gathered out of the pool (`out[rows]`) before the next replay. Capture runs largest first.

`capture=False` runs the same static-shape steps eagerly, on any device: the CPU stand-in that the
tests compare with HF and with the engine's own decode (tests/test_gen_hf.py).
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from millis.common.errors import MillisError
from millis.gen.models.layers import Attention, Batch, visible_keys
from millis.gen.models.fused_decode import fused_decode, gemv_shapes, gemv_usable, layer_us
from millis.gen.models.fused_decode import usable as fused_usable
from millis.gpu import decode_gemv, decode_layer
from millis.gpu import decode_kernels as dk
from millis.gpu.graph_timing import context_usable

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_KV_BUCKET = 256  # the shortest KV bucket: below it a decode step is launch-bound, not length-bound


def kv_buckets(max_seq: int, smallest: int = MIN_KV_BUCKET) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_seq, then max_seq itself."""
    out, n = [], smallest
    while n < max_seq:
        out.append(n)
        n *= 2
    return tuple(out) + (max_seq,)


class GraphedDecode:
    """Callable (tokens, positions, slots) -> logits (n, vocab) for the engine's decode rows."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq: int, capture: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, lengths: tuple[int, ...] | None = None) -> None:
        dev = next(model.parameters()).device
        if capture and dev.type != "cuda":
            raise MillisError("CUDA graphs need the model on a CUDA device")
        self.model, self.max_seq, self.device = model, max_seq, dev
        self.window = getattr(model.config, "sliding_window", 0)  # Mistral / Qwen2; 0: every earlier key
        self.fused = fused_usable(model)
        self.one_row = gemv_usable(model)  # with self.fused: batch 1 through decode_gemv's kernels
        self.per_layer = self.fused and self.one_row and decode_layer.usable(model)  # ... in one kernel a layer
        self.layer_us: dict = {}  # on CUDA: the layers in one kernel each and in five (fused_decode.layer_us)
        self.layer_agreement: dict = {}  # on CUDA: the one-kernel step's logits against five's (a run records it)
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.lengths = sorted({n for n in (lengths or kv_buckets(max_seq)) if n < max_seq} | {max_seq})
        # a bucket's inputs: ids and positions (B, 1) as two views of one (2, B, 1) tensor, filled from one
        # pinned host buffer by one copy a step
        self.inputs = {b: torch.zeros(2, b, 1, dtype=torch.long, device=dev) for b in self.buckets}
        self.host = {b: torch.zeros(2, b, 1, dtype=torch.long, pin_memory=dev.type == "cuda") for b in self.buckets}
        self.ids = {b: self.inputs[b][0] for b in self.buckets}   # (B, 1)
        self.pos = {b: self.inputs[b][1] for b in self.buckets}   # (B, 1)
        cuda = dev.type == "cuda"
        # the copy from a host buffer is done before it is written again (rows retried one by one after a
        # batch-mate raised are stepped with no sync between)
        self.copied = {b: torch.cuda.Event() if cuda else None for b in self.buckets}
        self.flag_host = torch.zeros(1, dtype=torch.int32, pin_memory=cuda)  # the layer kernel's flag, each step
        self.flag_read = False  # the last call copied the flag into flag_host
        self.out: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.steps: Counter[tuple[int, int]] = Counter()  # (B, L) -> decode steps run with it
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        if self.fused:
            self._try_fused()
        if capture:
            for b in reversed(self.buckets):
                for n in reversed(self.lengths):
                    self._capture(b, n)

    @torch.inference_mode()
    def _try_fused(self) -> None:
        """Compile the fused kernels with one eager step at the scratch position; a Triton that cannot build
        them leaves the torch step in their place (with a warning), not an engine that fails to open. The newest
        parts go first: a failure retries without one kernel a layer (decode_layer, also dropped when one of its
        barriers gave up), then without PDL (decode_kernels.pdl)."""
        weight = self.model.tok_emb.weight
        for _ in range(3):
            try:
                if self.device.type == "cuda" and self.one_row:  # the batch-1 matmuls' tiles, measured
                    decode_gemv.tune(gemv_shapes(self.model), weight.dtype)
                for b in self.buckets[:2]:  # batch 1 (its own kernels) and a batch of several rows
                    self.pos[b].fill_(self.max_seq - 1)
                    self._forward(b, self.lengths[0])
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if self.per_layer:  # its barriers opened (every program resident), then its tiles measured
                    self._check_layer_barriers()
                    if self.device.type == "cuda":
                        decode_layer.tune(self.model, self.lengths[0], self.window)
                        self.layer_us = layer_us(self.model, self.lengths[0], self.window)
                        self._check_layer_barriers()
                        # measured, not assumed: one kernel a layer where it beats five (a layer of wide matmuls
                        # may stream its weights faster from many short programs than from one an SM)
                        self.per_layer = self.layer_us["per_layer"] < self.layer_us["five_kernels"]
                    if self.per_layer:
                        self.per_layer = self._layer_kernel_agrees()
                return
            except Exception as e:  # noqa: BLE001 -- a compile error of this Triton / GPU
                why = f"{type(e).__name__}: {str(e)[:300]}"
                if not context_usable():  # a kernel fault poisons the context: no fallback can help
                    raise
                if self.per_layer:
                    self.per_layer = False
                    warnings.warn(f"one kernel a layer unavailable ({why}); decode_gemv's five a layer")
                    continue
                if dk.pdl(weight):
                    dk.pdl_off(why)
                    warnings.warn(f"programmatic dependent launch unavailable ({why}); the kernels without it")
                    continue
                warnings.warn(f"fused decode kernels unavailable ({why}); decoding with the torch step")
                self.fused = False
                return

    def _layer_kernel_agrees(self, tol: float = 5e-2) -> bool:
        """One batch-1 step at the scratch position in one kernel a layer and in five: the same top token and the
        same logits within rounding, or the five stay (a barrier that let a phase read another program's unfinished
        writes would show here, not in a user's tokens). Their tiles may sum in another order, and bf16's
        roundings then part over 30 layers: ~1% (review), so 5%; a torn read is far more."""
        self.pos[1].fill_(self.max_seq - 1)
        one = fused_decode(self.model, self.ids[1], self.pos[1], self.lengths[0], self.window, True, True)
        five = fused_decode(self.model, self.ids[1], self.pos[1], self.lengths[0], self.window, True, False)
        err = ((one - five).norm() / five.norm().clamp_min(1e-30)).item()
        self.layer_agreement = {"relative_error": err, "same_top_token": bool(one.argmax() == five.argmax()), "tol": tol}
        if torch.isfinite(one).all() and err < tol and self.layer_agreement["same_top_token"]:
            return True
        warnings.warn(f"one kernel a layer gave other logits than five (relative error {err:.3g}): five a layer")
        return False

    @torch.inference_mode()
    def _leave_layer_kernel(self) -> None:
        """A barrier gave up while decoding (its step's logits came out NaN): five kernels a layer from now on,
        the batch-1 graphs captured again."""
        warnings.warn("a grid barrier of the layer kernel gave up while decoding (that step's logits were NaN): "
                      "five kernels a layer from now on")
        self.per_layer = False
        decode_layer.sync_state(self.model)[1].zero_()
        self.flag_host.zero_()
        for n in self.lengths:
            if (1, n) in self.graphs:
                self._capture(1, n)

    def _check_layer_barriers(self) -> None:
        if decode_layer.failed(self.model):
            raise RuntimeError("a grid barrier of the layer kernel gave up: its programs were not all resident")

    def _forward(self, b: int, n: int) -> torch.Tensor:
        if self.fused:  # Llama family on CUDA: 8 fused kernels a layer, 5 at batch 1 (models/fused_decode.py)
            return fused_decode(self.model, self.ids[b], self.pos[b], n, self.window, self.one_row, self.per_layer)
        pos = self.pos[b]
        # an idle row (the scratch position) sees every key: with a sliding window none of the first L would be
        # visible to it, and an all-masked row's NaN, written to its slot, would reach a later request there
        mask = visible_keys(pos, n, self.window) | (pos == self.max_seq - 1)[:, None, :, None]  # (B, 1, 1, L)
        batch = Batch(ids=self.ids[b], pos=pos, slots=torch.arange(b, device=self.device), kv_len=n,
                      mask=mask, rows=slice(0, b))
        return self.model(batch)[:, -1]                                         # (B, vocab)

    @torch.inference_mode()
    def _capture(self, b: int, n: int) -> None:
        self.pos[b].fill_(self.max_seq - 1)  # warm-up and capture write only the scratch position
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: lazy inits, cuBLAS workspaces
                self._forward(b, n)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self.out[b, n] = self._forward(b, n)
        self.graphs[b, n] = g

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        b = next(x for x in self.buckets if x > max(slots))
        n = next(x for x in self.lengths if x > max(positions))  # positions [0, p] of every row
        if self.per_layer and self.flag_host[0]:  # the step before's barrier gave up (read after its sync)
            self._leave_layer_kernel()
        self.flag_read = False
        if self.copied[b] is not None:
            self.copied[b].synchronize()  # at once in a plain step: its tokens were read since
        host = self.host[b].numpy()  # (2, B, 1)
        host[0] = 0
        host[1] = self.max_seq - 1
        host[0, slots, 0], host[1, slots, 0] = tokens, positions
        self.inputs[b].copy_(self.host[b], non_blocking=True)
        if self.copied[b] is not None:
            self.copied[b].record()
        self.steps[b, n] += 1
        if (b, n) in self.graphs:
            self.graphs[b, n].replay()
            out = self.out[b, n]
        else:
            out = self._forward(b, n)
        if b == 1 and self.per_layer and self.device.type == "cuda":  # read after the step's sync (failed_step)
            self.flag_host.copy_(decode_layer.sync_state(self.model)[1], non_blocking=True)
            self.flag_read = True
        # out of the shared pool before the next replay; compacted rows (the engine's usual case) need no index
        if slots == list(range(len(slots))):
            return out[:len(slots)].clone()
        return out[torch.tensor(slots, device=self.device)]

    def failed_step(self) -> bool:
        """Whether the last call's rows came out NaN because a grid barrier of the layer kernel gave up: asked by
        the engine after the step's host sync (the flag's copy is ordered before it). Their KV caches then hold
        NaN at that position, so the engine ends those requests with an error, not a token."""
        return self.flag_read and bool(self.flag_host[0])

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, n_pos: int) -> None:
        """Move a request's KV (positions [0, n_pos) of slot src) to the free slot dst, every layer."""
        for m in self.model.modules():
            if isinstance(m, Attention) and m.cache is not None:
                m.cache.k[dst, :, :n_pos] = m.cache.k[src, :, :n_pos]
                m.cache.v[dst, :, :n_pos] = m.cache.v[src, :, :n_pos]


def compact_slots(slots: list, move, move_rows) -> None:
    """The engine's slots (Request or None), after admission filled the lowest free ones: move the highest
    running requests down into the free slots below them, with their KV (`move(src, dst, n_pos)`, e.g.
    GraphedDecode.move_slot) and their penalty rows (`move_rows(dst, src)`, SlotPenalties.move), so the batch
    bucket follows the running count."""
    while None in slots:
        hole = slots.index(None)
        top = max((i for i, r in enumerate(slots) if r is not None), default=-1)
        if top < hole:
            return
        r = slots[top]
        move(top, hole, r.n_cached)
        slots[hole], slots[top], r.slot = r, None, hole
        move_rows(hole, top)

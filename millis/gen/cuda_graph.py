"""Static-shape decode, captured as one CUDA graph per batch-size bucket (gpt-fast style). A sketch:
it has run on CPU (eagerly, in the tests) but not yet on a GPU.

The decode step of bucket B always feeds slots 0..B-1 and attends over all max_seq positions, so
its shapes never change and the whole forward can be replayed from a graph: the host only copies
B token ids and positions into the static inputs and replays. The mask is computed inside the
graph from those positions by the engine's own rule (`visible_keys`, with the model's sliding
window). Rows of the bucket with no running request are fed token 0 at position max_seq - 1, a
scratch position no request ever reaches (a request ends when prompt + output reach max_seq, so it
writes at most position max_seq - 2). The engine assigns the lowest free slot, which keeps running
requests in the low slots and the bucket small.

`capture=False` runs the same static-shape step eagerly, on any device: the CPU stand-in that the
tests compare with HF and with the engine's own decode (tests/test_gen_hf.py).
"""
from __future__ import annotations

import torch
from torch import nn

from millis.common.errors import MillisError
from millis.gen.models.layers import Batch, visible_keys

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GraphedDecode:
    """Callable (tokens, positions, slots) -> logits (n, vocab) for the engine's decode rows."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq: int, capture: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> None:
        dev = next(model.parameters()).device
        if capture and dev.type != "cuda":
            raise MillisError("CUDA graphs need the model on a CUDA device")
        self.model, self.max_seq, self.device = model, max_seq, dev
        self.window = getattr(model.config, "sliding_window", 0)  # Mistral / Qwen2; 0: every earlier key
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.ids = {b: torch.zeros(b, 1, dtype=torch.long, device=dev) for b in self.buckets}   # (B, 1)
        self.pos = {b: torch.zeros(b, 1, dtype=torch.long, device=dev) for b in self.buckets}   # (B, 1)
        self.out: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            for b in self.buckets:
                self._capture(b)

    def _forward(self, b: int) -> torch.Tensor:
        pos = self.pos[b]
        mask = visible_keys(pos, self.max_seq, self.window)                     # (B, 1, 1, max_seq)
        batch = Batch(ids=self.ids[b], pos=pos, slots=torch.arange(b, device=self.device), kv_len=self.max_seq,
                      mask=mask, rows=slice(0, b))
        return self.model(batch)[:, -1]                                         # (B, vocab)

    @torch.inference_mode()
    def _capture(self, b: int) -> None:
        self.pos[b].fill_(self.max_seq - 1)  # warm-up and capture write only the scratch position
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: lazy inits, cuBLAS workspaces
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.out[b] = self._forward(b)
        self.graphs[b] = g

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        b = next(x for x in self.buckets if x > max(slots))
        ids = [0] * b
        pos = [self.max_seq - 1] * b
        for t, p, s in zip(tokens, positions, slots):
            ids[s], pos[s] = t, p
        self.ids[b].copy_(torch.tensor(ids)[:, None], non_blocking=True)
        self.pos[b].copy_(torch.tensor(pos)[:, None], non_blocking=True)
        if b in self.graphs:
            self.graphs[b].replay()
            out = self.out[b]
        else:
            out = self._forward(b)
        return out[torch.tensor(slots, device=self.device)]

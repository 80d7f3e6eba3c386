"""CUDA runtime: the compact encoder (millis.gpu) captured as one CUDA graph per (batch, seq) bucket.

At load, every bucket gets static device inputs (3, B', T') (ids, mask, token types), a pinned host
twin, and a graph whose replay is the whole forward pass (embeddings, all layers, the head). A batch
(B, T) runs in the smallest captured bucket with B' >= B and T' >= T: it is padded with mask-0 tokens
and mask-0 rows, which the attention mask and the final slice make invisible. A batch no bucket holds
runs eagerly at its own shape. One call: one host->device copy, one replay, one device->host copy.
`cold_start_s` is load -> all graphs captured, CUDA initialisation and Triton compilation included.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.gpu.encoder import Encoder, RunOptions, from_hf
from millis.runtimes.base import check_batch, masked_states
from millis.encoder.source import Pooling, dir_pooling

# What `millis serve` batches into by default: powers of two up to 32 rows, 16..128 tokens.
DEFAULT_BUCKETS = tuple(Shape(b, s) for b in (1, 2, 4, 8, 16, 32) for s in (16, 32, 64, 128))


def pick_bucket(buckets: tuple[Shape, ...], batch: int, seq: int) -> Shape | None:
    """The captured shape that holds (batch, seq) with the fewest padded tokens, or None."""
    fits = [s for s in buckets if s.batch >= batch and s.seq >= seq]
    return min(fits, key=lambda s: (s.batch * s.seq, s.seq)) if fits else None


@dataclass
class _Slot:
    host: torch.Tensor                    # (3, B', T') int64, pinned on CUDA
    dev: torch.Tensor                     # (3, B', T') int64 on the device: the graphs' inputs
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None       # (B', N) float32, written by each replay
    dense: torch.cuda.CUDAGraph | None = None  # the unmasked twin (flash attention), for full batches
    dense_out: torch.Tensor | None = None


class CudaGraphRuntime:
    def __init__(self, model: Any, name: str, input_names: tuple[str, ...], output_name: str, task: str,
                 pooling: Pooling | None = None, dtype: str = "fp16", buckets: tuple[Shape, ...] = DEFAULT_BUCKETS,
                 fuse: str = "triton", device: str = "cuda", capture: bool = True, dense: bool = False,
                 gemm: str = "fp"):
        """model: a local HF directory, an in-memory HF BERT model, or a millis.gpu Encoder.
        capture=False (or device="cpu") pads into the buckets but runs eagerly: the same code path
        without graphs, for CPU tests and debugging. dense=True also captures each bucket without the
        attention mask; a batch that fills its bucket exactly with no padding replays that one.
        gemm int8 / fp8: W8A8 GEMMs (millis.gpu.w8a8), their kernels' tiles measured for the buckets' row
        counts before capture (`tuned`: what was timed)."""
        t0 = time.perf_counter()
        if isinstance(model, Encoder):
            self.encoder = model
        else:
            if pooling is None:
                pooling = dir_pooling(Path(model)) if isinstance(model, (str, Path)) else Pooling()
            self.encoder = from_hf(model, task, pooling, RunOptions(dtype=dtype, fuse=fuse, device=device, gemm=gemm))
        self.name, self.input_names, self.output_name = name, input_names, output_name
        self.device = self.encoder.device
        self.max_length = self.encoder.cfg.max_positions
        self.vocab_size = self.encoder.cfg.vocab  # an id past the embedding table is a device fault, not an error
        self.buckets = tuple(sorted(set(buckets), key=lambda s: (-s.batch * s.seq, -s.seq)))  # largest first
        for s in self.buckets:
            if s.seq > self.max_length:
                raise MillisError(f"bucket {s.name} is longer than the model's {self.max_length} positions")
        self.capture = capture and self.device.type == "cuda"
        self.dense = dense and self.capture
        self._lock = threading.Lock()
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._slots: dict[Shape, _Slot] = {}
        self.tuned = self._tune_w8a8() if self.capture else {}
        with torch.inference_mode():
            for s in self.buckets:
                self._slots[s] = self._make_slot(s)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.cold_start_s = time.perf_counter() - t0

    # ---- load ----

    def _make_slot(self, s: Shape) -> _Slot:
        dev = torch.zeros(3, s.batch, s.seq, dtype=torch.int64, device=self.device)
        host = torch.zeros(3, s.batch, s.seq, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        slot = _Slot(host, dev)
        if not self.capture:
            return slot
        dev[1].fill_(1)  # warm up (Triton compiles, cuBLAS picks its kernels) on a full mask
        slot.graph, slot.out = self._capture(dev, dense=False)
        if self.dense:
            slot.dense, slot.dense_out = self._capture(dev, dense=True)
        return slot

    def _tune_w8a8(self) -> dict:
        """W8A8 GEMMs: each weight shape's fastest kernel tile at each bucket's row count (B' x T')."""
        lw = self.encoder.layers[0] if self.encoder.layers else None
        if lw is None or self.encoder.options.gemm == "fp" or self.encoder.options.fuse != "triton":
            return {}
        from millis.gpu import w8a8_kernels

        if w8a8_kernels.triton is None:
            return {}
        with torch.inference_mode():
            return w8a8_kernels.tune([lw.wqkv, lw.wo, lw.w1, lw.w2], tuple(s.batch * s.seq for s in self.buckets),
                                     self.encoder.dtype)

    def _capture(self, dev: torch.Tensor, dense: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.encoder(dev[0], dev[1], dev[2], dense=dense)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # one pool: graphs never run at once
            out = self.encoder(dev[0], dev[1], dev[2], dense=dense)
        return graph, out

    @property
    def graphs(self) -> int:
        return sum((s.graph is not None) + (s.dense is not None) for s in self._slots.values())

    # ---- run ----

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.checked(batch)
        B, T = feeds["input_ids"].shape
        shape = pick_bucket(self.buckets, B, T)
        with self._lock, torch.inference_mode():
            out = self._eager(feeds) if shape is None else self._replay(self._slots[shape], feeds, B, T)
        return {self.output_name: out}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, full: bool = False) -> torch.Tensor:
        """Device tensors (B, T) in, (B, N) float32 on the device out, for callers that tokenize onto
        the GPU themselves. A graph's output is copied out of the graphs' shared pool: another bucket's
        replay may reuse that memory. full=True: the caller knows attention_mask is all ones (reading it
        here would sync)."""
        B, T = input_ids.shape
        shape = pick_bucket(self.buckets, B, T)
        with self._lock, torch.inference_mode():
            if shape is None or not self.capture:
                return self.encoder(input_ids, attention_mask, token_type_ids)
            slot = self._slots[shape]
            if (B, T) != (shape.batch, shape.seq) or token_type_ids is None:
                slot.dev.zero_()
            slot.dev[0, :B, :T].copy_(input_ids)
            slot.dev[1, :B, :T].copy_(attention_mask)
            if token_type_ids is not None:
                slot.dev[2, :B, :T].copy_(token_type_ids)
            if full and slot.dense is not None and (B, T) == (shape.batch, shape.seq):
                slot.dense.replay()
                return slot.dense_out.clone()
            slot.graph.replay()
            return slot.out[:B].clone()

    def _replay(self, slot: _Slot, feeds: dict[str, np.ndarray], B: int, T: int) -> np.ndarray:
        h = slot.host.numpy()
        h.fill(0)  # padding: token 0, mask 0, type 0
        h[0, :B, :T] = feeds["input_ids"]
        h[1, :B, :T] = feeds["attention_mask"]
        if "token_type_ids" in feeds:
            h[2, :B, :T] = feeds["token_type_ids"]
        slot.dev.copy_(slot.host, non_blocking=True)
        if slot.dense is not None and h[1].all():  # full bucket, no padding: the unmasked graph
            slot.dense.replay()
            out = slot.dense_out
        elif slot.graph is not None:
            slot.graph.replay()
            out = slot.out
        else:
            out = self.encoder(slot.dev[0], slot.dev[1], slot.dev[2])
        return out[:B].float().cpu().numpy()  # the copy waits for the replay

    def token_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, T) inputs -> (B, T, H) float32, every token's last hidden state (TEI's /embed_all), zeros where the
        mask drops a token: the encoder run eagerly (only the pooled forward is captured: the hot path), under the
        lock the replays take."""
        feeds = self.checked(batch)
        t = self.on_device(feeds)
        with self._lock, torch.inference_mode():
            h = self.encoder(t["input_ids"], t["attention_mask"], t.get("token_type_ids"), states=True)
            return masked_states(h.float().cpu().numpy(), feeds["attention_mask"])

    def checked(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        if feeds["input_ids"].shape[1] > self.max_length:
            raise MillisError(f"sequence length {feeds['input_ids'].shape[1]} exceeds the model's {self.max_length} "
                              f"positions")
        return feeds

    def on_device(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(a).to(self.device) for n, a in feeds.items()}

    def _eager(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        t = self.on_device(feeds)
        out = self.encoder(t["input_ids"], t["attention_mask"], t.get("token_type_ids"))
        return out.float().cpu().numpy()

    # ---- from a recipe (millis.runtimes.registry.open_runtime) ----

    @classmethod
    def from_options(cls, model_dir: Path, name: str, input_names: tuple[str, ...], output_name: str,
                     options: dict[str, Any]) -> "CudaGraphRuntime":
        pooling = Pooling(**options["pooling"]) if options.get("pooling") else None
        buckets = tuple(Shape.parse(s) for s in options.get("buckets", ())) or DEFAULT_BUCKETS
        return cls(model_dir, name, input_names, output_name, options["task"], pooling,
                   dtype=options.get("dtype", "fp16"), buckets=buckets, fuse=options.get("fuse", "triton"),
                   device=options.get("device", "cuda"), dense=bool(options.get("dense", False)),
                   gemm=options.get("gemm", "fp"))

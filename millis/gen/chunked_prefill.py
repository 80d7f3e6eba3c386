"""A step's prompt chunks (`scheduling.Chunk`) through the model: each chunk's KV written into its request's
slot, and the logits at the last token of every prompt a chunk ends (sampled with the decode rows' logits).

A chunk is one forward from its start position that attends to the positions before it through the cache.
Native models (paged KV): once a chunk is written, its request's whole prompt blocks up to the chunk's end
are keyed in the prefix cache; a block is keyed only when every position of it is written, so a request
that shares it never reads a position still to come. The torch model: a step's whole prompts in one
right-padded forward, or a lone whole prompt from a CUDA graph of its token bucket (`graphed`,
cuda_prefill.GraphedPrefill), else the chunk eagerly.
"""
from __future__ import annotations

import torch

from millis.gen.models.layers import make_batch, padded_batch
from millis.gen.request import Request
from millis.gen.rows import isolated, per_row_on_error
from millis.gen.scheduling import Chunk


def prefill_chunks(model, chunks: list[Chunk], failed: dict[str, str], kv=None, graphed=None, window: int = 0,
                   device: str | torch.device = "cpu") -> tuple[list[Request], list[torch.Tensor]]:
    """The requests whose prompt a chunk ended, and their logits (parts of (n, vocab)). A request whose chunk
    raises lands in `failed` (id -> reason); the others go on (`rows.py`)."""
    rows, logits = [], []
    if kv is None and len(chunks) > 1 and all(c.start == 0 and c.last for c in chunks):
        def pad(rs: list[Request]) -> torch.Tensor:
            return model(padded_batch([r.feed for r in rs], [r.slot for r in rs], window, device))[:, -1]
        for part, out in per_row_on_error([c.r for c in chunks], pad, failed):
            rows += part
            logits.append(out)
        for r in rows:
            r.prefilled = len(r.feed)
        return rows, logits
    for c in chunks:
        out = isolated(failed, c.r, lambda c=c: _forward(model, c, graphed, window, device))
        if c.r.id in failed:
            continue
        c.r.prefilled = c.end
        if kv is not None:
            kv.register(c.r.slot, c.r.keys[:c.end // kv.block_size])
        if c.last:
            rows.append(c.r)
            logits.append(out)
    return rows, logits


def _forward(model, c: Chunk, graphed, window: int, device) -> torch.Tensor:
    """Positions [start, end) of c's prompt written into its slot; logits (1, vocab) at the last of them."""
    r = c.r
    out = graphed(r.feed, r.slot) if graphed is not None and c.start == 0 and c.last else None
    if out is None:
        out = model(make_batch([r.feed[c.start:c.end]], [c.start], [r.slot], window, device=device))[:, -1]
    return out

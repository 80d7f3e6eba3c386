"""OpenAI's logprobs objects of an answer: per streamed chunk, or for a whole answer built a slice at a time."""
from __future__ import annotations

import asyncio
import itertools
from typing import Any

LOWEST = -9999.0  # the log p given for -inf (JSON has no -inf)


def logprobs_body(chat: bool, entries, tok, pieces: dict | None = None, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's logprobs object for `entries` (StepOutput.logprobs items: (id, log p, top)), tokens as
    `tok` decodes each alone (no tokenizer: the id), each id decoded once (`pieces`: id -> (text, its UTF-8
    bytes), shared by the calls of one answer). Chat: {content: [{token, logprob, bytes, top_logprobs}]};
    completions: {tokens, token_logprobs, top_logprobs, text_offset} (offsets from `offset`: where the first
    token starts in the answer's text). A log p of -inf (a token a grammar rules out, among the alternatives)
    is given as -9999.0, as vLLM gives it: JSON has no -inf (orjson would write null)."""
    if not entries:
        return None
    pieces = {} if pieces is None else pieces

    def piece(i: int) -> tuple[str, list[int]]:
        if (p := pieces.get(i)) is None:
            text = tok.decode([i]) if tok is not None else str(i)
            p = pieces[i] = (text, list(text.encode()))
        return p
    if chat:
        def item(i: int, v: float) -> dict[str, Any]:
            text, raw = piece(i)
            return {"token": text, "logprob": max(v, LOWEST), "bytes": raw}
        return {"content": [{**item(t, v), "top_logprobs": [item(i, w) for i, w in top]} for t, v, top in entries]}
    tokens = [piece(t)[0] for t, _, _ in entries]
    offsets = list(itertools.accumulate((len(x) for x in tokens[:-1]), initial=offset))
    return {"tokens": tokens, "token_logprobs": [max(v, LOWEST) for _, v, _ in entries], "text_offset": offsets,
            "top_logprobs": [{piece(i)[0]: max(w, LOWEST) for i, w in top} for _, _, top in entries]
            if entries[0][2] else None}


def joined_logprobs(chat: bool, parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The logprobs object of consecutive slices of one answer (each logprobs_body's, its offsets from where the
    slice starts in the answer), as one."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "text_offset")} | {
        "top_logprobs": None if parts[0]["top_logprobs"] is None else [t for p in parts for t in p["top_logprobs"]]}


def next_offset(body: dict[str, Any] | None, offset: int) -> int:
    """Where the text after a completions logprobs object's tokens starts (chat objects have no offsets)."""
    if body is None or "text_offset" not in body:
        return offset
    return body["text_offset"][-1] + len(body["tokens"][-1])


LOGPROBS_SLICE = 32  # tokens of logprobs built between two turns of the event loop (20 alternatives: ~6 ms)


async def answer_logprobs(chat: bool, entries: list, tok) -> dict | None:
    """logprobs_body of a whole answer, a slice at a time, the event loop serving others between slices
    (2,048 tokens of 20 alternatives are ~0.4 s of Python: built at once, every other request waited)."""
    pieces: dict = {}
    parts, offset = [], 0
    for k in range(0, len(entries), LOGPROBS_SLICE):
        if k:
            await asyncio.sleep(0)
        parts.append(logprobs_body(chat, entries[k:k + LOGPROBS_SLICE], tok, pieces, offset))
        offset = next_offset(parts[-1], offset)
    return joined_logprobs(chat, parts)

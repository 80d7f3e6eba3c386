"""OpenAI's logprobs objects of an answer: per streamed chunk, or for a whole answer built a slice at a time."""
from __future__ import annotations

import asyncio
import codecs
from typing import Any

from millis.gen.tokenizer import token_bytes, token_text

LOWEST = -9999.0  # the log p given for -inf (JSON has no -inf)


class TextOffset:
    """Where the next token of an answer starts in its text, in characters: the answer's tokens' bytes decoded as
    they come, so the bytes of a character several tokens spell count once, when it is whole (its tokens all start
    where it starts)."""

    def __init__(self) -> None:
        self.chars = 0
        self.spelt: str | None = ""  # what the tokens spell until the answer's first text is out (then None)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, raw: bytes) -> int:
        """The offset of a token of these bytes; moves past them."""
        at, part = self.chars, self.decoder.decode(raw)
        self.chars += len(part)
        if self.spelt is not None:
            self.spelt += part
        return at

    def step(self, text: str) -> None:
        """A step's tokens are taken and it emitted `text`. The answer's first text may lack the leading space its
        first token spells (a SentencePiece decoder drops it after BOS): the offsets after it then count one less."""
        if self.spelt is None or not text:
            return
        if self.spelt.startswith(" ") and self.spelt[1:] == text:
            self.chars -= 1
        self.spelt = None


def logprobs_body(chat: bool, entries, tok, pieces: dict | None = None,
                  at: TextOffset | None = None) -> dict[str, Any] | None:
    """OpenAI's logprobs object for `entries` (StepOutput.logprobs items: (id, log p, top)), tokens named by
    `token_text` (no tokenizer: the id) with the bytes each adds to the text (`token_bytes`: a byte of a character
    several tokens spell is that byte, not U+FFFD's), each id read once (`pieces`: id -> (text, bytes), shared by
    the calls of one answer). Chat: {content: [{token, logprob, bytes, top_logprobs}]}; completions: {tokens,
    token_logprobs, top_logprobs, text_offset} (offsets run on in `at`, one per answer), each position's
    top_logprobs the alternatives and the chosen token, as OpenAI's and vLLM's (`logprobs: 0`: the chosen alone). A log p of -inf
    (a token a grammar rules out, among the alternatives) is given as -9999.0, as vLLM gives it: JSON has no -inf
    (orjson would write null)."""
    if not entries:
        return None
    pieces = {} if pieces is None else pieces

    def piece(i: int) -> tuple[str, bytes]:
        if (p := pieces.get(i)) is None:
            raw = token_bytes(tok, i)
            p = pieces[i] = (token_text(tok, i, raw), raw)
        return p

    def alternatives(t: int, v: float, top) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, w in (*top, (t, v)):  # best first: a name two ids share keeps the likelier's log p
            out.setdefault(piece(i)[0], max(w, LOWEST))
        return out
    if chat:
        def item(i: int, v: float) -> dict[str, Any]:
            text, raw = piece(i)
            return {"token": text, "logprob": max(v, LOWEST), "bytes": list(raw)}
        return {"content": [{**item(t, v), "top_logprobs": [item(i, w) for i, w in top]} for t, v, top in entries]}
    at = TextOffset() if at is None else at
    return {"tokens": [piece(t)[0] for t, _, _ in entries], "token_logprobs": [max(v, LOWEST) for _, v, _ in entries],
            "text_offset": [at.take(piece(t)[1]) for t, _, _ in entries],
            "top_logprobs": [alternatives(t, v, top) for t, v, top in entries]}


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


LOGPROBS_SLICE = 32  # tokens of logprobs built between two turns of the event loop (20 alternatives: ~6 ms)


async def answer_logprobs(chat: bool, steps: list, tok) -> dict | None:
    """logprobs_body of a whole answer, its engine steps (each (logprobs entries, text)) one after another, the event
    loop serving others every LOGPROBS_SLICE tokens (2,048 tokens of 20 alternatives are ~0.4 s of Python: built at
    once, every other request waited)."""
    pieces: dict = {}
    parts, at, since = [], TextOffset(), 0
    for entries, text in steps:
        if since >= LOGPROBS_SLICE:
            await asyncio.sleep(0)
            since = 0
        parts.append(logprobs_body(chat, entries, tok, pieces, at))
        at.step(text)
        since += len(entries)
    return joined_logprobs(chat, parts)

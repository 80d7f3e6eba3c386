"""One admitted request's answer: its n choices (each an engine request) as one JSON body or one event stream.

Each choice is a `Live` of its own in the engine (the scheduler shares the prompt's cached KV blocks
between them); the answer waits for every choice's first token (503 past request_timeout_s), then:

- JSON: each choice's text joined; a tool-constrained answer is parsed into `tool_calls`;
- events: each choice's chunks as they come, tagged with its index. A choice that may call tools sends
  what its text so far shows for sure: content (a generic {"response": ...} answer's string, or text a
  native format's auto answer shows cannot be a call, before a `<tool_call>`), and, while the grammar makes
  the answer calls (format.streams_calls), each call as OpenAI streams it (announced with its name, then its
  arguments' text as it grows: tool_stream.py). Calls of an auto answer of a native format (free, or strict:
  its calls constrained, its text free) are parsed when it ends and sent whole, after the rest of its content
  (the text after them; whitespace before a call is held back, as parse drops it).
  Then (usage,) `[DONE]`.

Whatever ends the request (finished, client gone, timeout, error) cancels every choice still running.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.responses import Response

from millis.serve import schemas
from millis.serve.generation import schemas as gs
from millis.serve.generation.logprobs import TextOffset, answer_logprobs, logprobs_body
from millis.serve.generation.tool_stream import CallStream, Scan
from millis.serve.generation.tools import is_json
from millis.serve.http import ClientGone, json_response, watch_disconnect

log = logging.getLogger("millis.serve")


def failure_answer(g, e: Exception) -> schemas.ApiError:
    """What a request that failed in the engine's step is answered (it alone): a 422 naming the field its grammar
    came from when decoding could not follow that grammar (`GrammarFailed`: a schema past llguidance's parser
    limits), else a 500 with the reason (gen.rows.reason keeps it short)."""
    if g.params.grammar and "GrammarFailed: " in str(e):  # the engine's reason: "<exception type>: <message>"
        return schemas.ApiError(422, f"{g.grammar_from}: {e}", param=g.grammar_from, code="grammar_too_complex")
    log.warning("millis serve: %s", e)
    return schemas.ApiError(500, str(e), code="generation_failed")


class Choices:
    """The lives of one request's choices; what the disconnect watcher drops."""

    def __init__(self, lives: list) -> None:
        self.lives = lives

    def drop(self, exc: Exception) -> None:
        for live in self.lives:
            live.drop(exc)


def _answer(g: gs.GenRequest, text: str, finish: str) -> tuple[str | None, list, str]:
    """(content, tool_calls, finish_reason) of one finished choice."""
    if g.tools is None:
        return text, [], finish
    content, calls = g.tool_format.parse(text, g.tools)
    # an answer cut by a stop string or max_tokens inside a call ends as the engine said: its whole calls are returned
    whole = all(is_json(c["function"]["arguments"]) for c in calls) and not g.tool_format.cut(text, g.tools)
    return content, calls, "tool_calls" if calls and finish == "stop" and whole else finish


async def respond(st, request, g: gs.GenRequest, lives: list, chat: bool, on_close) -> Response:
    """The answer for `lives` (admitted); `on_close(lives)` when a stream ends, however it ends."""
    cfg = st.cfg
    watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, Choices(lives)))
    streaming = False
    try:
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(st.next(live) for live in lives)), cfg.request_timeout_s)
        except TimeoutError:
            for live in lives:
                st.cancel(live, "timeout")
            raise schemas.ApiError(503, f"no token within {cfg.request_timeout_s} s", code="timeout",
                                   headers={"Retry-After": "1"}) from None
        if g.stream:
            watcher.cancel()  # from here the streaming response watches the connection itself
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            streaming = True
            return on_close(events(st, lives, firsts, g, chat))

        async def rest(live, first) -> list:
            outs = [first]
            while not outs[-1].finished:
                outs.append(await st.next(live))
            return outs

        per_choice = await asyncio.gather(*(rest(live, f) for live, f in zip(lives, firsts)))
        choices = []
        for i, outs in enumerate(per_choice):
            lp = await answer_logprobs(chat, [(o.logprobs, o.text) for o in outs], st.engine.tok)
            content, calls, finish = _answer(g, "".join(o.text for o in outs), outs[-1].finished)
            choices.append(gs.choice(chat, i, content, finish, lp, calls))
        use = gs.usage(lives[0].prompt_tokens, sum(live.n_out for live in lives))
        return json_response(gs.response(chat, lives[0].id, int(time.time()), st.name, choices, use))
    finally:
        if not streaming:
            watcher.cancel()
            for live in lives:
                st.cancel(live, "cancelled")  # client gone, timeout or error: free the slots (no-op when done)


async def events(st, lives: list, firsts: list, g: gs.GenRequest, chat: bool):
    """The event stream: (chat: a role delta per choice,) text chunks, a finish chunk per choice, (usage,) [DONE]."""
    created, wu, rid = int(time.time()), g.include_usage, lives[0].id
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, live, first) -> None:
        o = first
        try:
            while True:
                merged.put_nowait((i, o))
                if o.finished:
                    return
                o = await st.next(live)
        except Exception as e:  # noqa: BLE001 -- ends the stream with an error event
            merged.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, live, f)) for i, (live, f) in enumerate(zip(lives, firsts))]
    held = [Scan() for _ in lives]  # choices that may call tools: their text so far, and what scans found
    shown = [""] * len(lives)  # the content that went out already
    calls_out = [CallStream() for _ in lives]  # the calls that went out already (constrained answers)
    offsets = [TextOffset() for _ in lives]  # completions' logprobs: where each choice's next token starts
    pieces: dict = {}  # logprobs: token id -> its text, decoded once
    # the grammar makes the whole answer calls (an auto answer under a strict tool's grammar still holds free text)
    constrained = bool(g.params.grammar) and g.tools is not None and g.tool_format.streams_calls(g.tools)
    try:
        if chat:
            for i in range(len(lives)):
                yield gs.chunk(chat, rid, created, st.name, None, None, first=True, with_usage=wu, index=i,
                               calls_only=g.tools is not None and g.tools.required)
        left = len(lives)
        while left:
            i, o = await merged.get()
            if isinstance(o, Exception):
                raise o
            lp = logprobs_body(chat, o.logprobs, st.engine.tok, pieces, offsets[i])  # offsets run on over the answer
            offsets[i].step(o.text)
            if g.tools is not None:  # the step's logprobs ride on its first chunk (an empty delta when none)
                held[i].extend(o.text)
                text = g.tool_format.content_so_far(held[i], constrained, g.tools.answer is not None)
                if len(text) > len(shown[i]) and text.startswith(shown[i]):
                    yield gs.chunk(chat, rid, created, st.name, text[len(shown[i]):], None, with_usage=wu, index=i,
                                   logprobs=lp)
                    shown[i], lp = text, None
                deltas = calls_out[i].update(g.tool_format.spans(held[i])) if constrained else []
                if deltas or lp is not None:
                    yield gs.chunk(chat, rid, created, st.name, None, None, with_usage=wu, index=i, calls=deltas,
                                   logprobs=lp)
            elif o.text or o.logprobs:  # held-back text (a possible stop string) still reports its logprobs
                yield gs.chunk(chat, rid, created, st.name, o.text, None, with_usage=wu, index=i, logprobs=lp)
            if o.finished:
                left -= 1
                finish = o.finished
                if g.tools is not None:
                    content, calls, finish = _answer(g, held[i].s, o.finished)
                    if calls_out[i].started:  # the calls went out as written (a cut answer's unfinished one too)
                        content, calls = None, []
                    elif shown[i]:  # the content went out as it came: the rest of it (after the calls too)
                        content = content[len(shown[i]):] if content and content.startswith(shown[i]) else None
                    if content or calls:
                        yield gs.chunk(chat, rid, created, st.name, content, None, with_usage=wu, index=i,
                                       calls=[{"index": k, **c} for k, c in enumerate(calls)])
                yield gs.chunk(chat, rid, created, st.name, None, finish, with_usage=wu, index=i)
    except Exception as e:  # noqa: BLE001 -- headers are sent: the error goes in the stream, then [DONE]
        if not isinstance(e, (ClientGone, RuntimeError, schemas.ApiError)):  # RequestFailed is a RuntimeError
            log.exception("millis serve: a stream failed")
        code = e.code or str(e.status) if isinstance(e, schemas.ApiError) else "500"  # shutting_down: the drain
        yield gs.event({"error": {"message": str(e), "type": "server_error", "param": None, "code": code}})
    else:
        if wu:
            yield gs.usage_chunk(chat, rid, created, st.name,
                                 gs.usage(lives[0].prompt_tokens, sum(live.n_out for live in lives)))
    finally:
        for t in tasks:
            t.cancel()
    yield gs.DONE

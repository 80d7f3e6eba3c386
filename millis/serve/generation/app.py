"""Serving a decoder: OpenAI `/v1/completions` and `/v1/chat/completions` over one `millis.gen` engine.

One worker thread opens the engine and owns its loop: it runs `eng.step()` while there is work and hands each
`StepOutput` to the event loop, onto its request's asyncio queue. HTTP handlers only add and cancel
(thread-safe in the engine): the engine's scheduler alone decides which requests run together.

A request: parse and validate (4xx) -> prompt ids (chat: the model's Jinja template, rendered as
transformers' `apply_chat_template(..., add_generation_prompt=True)` does) -> admit (429 when
waiting for a slot reach `max_queue`) -> wait for the first token (503 past `request_timeout_s`)
-> JSON, or server-sent events `data: {chunk}` ... `data: [DONE]`. A client that leaves frees its
slot at once: `engine.cancel` from the disconnect watcher, or when the event stream is closed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from millis.common.errors import MillisError
from millis.gen.config import SEED_MAX, SEED_MIN
from millis.gen.chat_template import encode_rendered
from millis.gen.tokenizer import prompt_char_limit
from millis.serve.generation import schemas as gs
from millis.serve.generation.respond import failure_answer, respond
from millis.serve.generation.tokenize import tokenize_routes
from millis.serve.generation.templates import ChatTemplates
from millis.serve import openapi, schemas
from millis.serve.http import (INLINE_TOKENIZE_CHARS, OFF_LOOP_THREADS, endpoint, health_response,
                               make_app, model_routes, off_loop, read_json, ready_response)
from millis.serve.config import ServeConfig
from millis.serve.dashboard import generation_live_routes
from millis.serve.metrics import GenMetrics

log = logging.getLogger("millis.serve")


@dataclass(eq=False)
class Live:
    """One admitted request, as the event loop sees it."""

    id: str
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepOutput, or an exception to raise
    t_submit: float = field(default_factory=perf_counter)
    t_first: float = 0.0
    t_last: float = 0.0
    n_out: int = 0
    done: bool = False

    def drop(self, exc: Exception) -> None:  # the disconnect watcher's call
        self.queue.put_nowait(exc)


class RequestFailed(RuntimeError):
    """What this one request raised inside the engine's step: a 500 for it alone."""


class SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends (finished, client gone, shutdown)."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class GenState:
    """Config, metrics, the engine (once loaded) and the worker thread that steps it."""

    def __init__(self, cfg: ServeConfig, loader: Callable[[], Any]):
        self.cfg, self.loader, self.metrics = cfg, loader, GenMetrics()
        self.limits = schemas.Limits(cfg.max_inputs, cfg.max_body_bytes, cfg.request_timeout_s)
        self.gen_limits: gs.GenLimits | None = None  # once the engine is loaded: bounds from its context
        self.chat = ChatTemplates(cfg.artifact, cfg.chat_template)
        self.name = cfg.model_name or Path(cfg.artifact).name or "model"
        self.engine = None
        self.context = 0  # once loaded: positions one request may fill (prompt + output)
        self.load_error: str | None = None
        self.cold_start_s = 0.0
        self.draining = False
        self.started_at = int(time.time())
        # grammar compiles hold at most all but one off-loop thread: a slow schema never stalls tokenization
        self.compiles = asyncio.Semaphore(max(1, OFF_LOOP_THREADS - 1))
        self.live: dict[str, Live] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._started = threading.Event()  # load() -> the engine thread: the engine is published, step it
        self._closing = False
        self._thread: threading.Thread | None = None
        self._request_s = 0.0  # moving mean of request durations, for Retry-After

    # ---- start-up and shutdown ---------------------------------------------------------------
    async def load(self) -> None:
        t0 = perf_counter()
        self._loop, opened = asyncio.get_running_loop(), Future()
        # one thread opens, warms and steps the engine (torch's OpenMP teams: encoder.batcher.RuntimeThread)
        thread = threading.Thread(target=self._engine_thread, args=(opened,), name="millis-engine", daemon=True)
        thread.start()
        try:
            eng = await asyncio.wrap_future(opened)
        except Exception as e:  # noqa: BLE001 -- reported on /ready and in the log; /health stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("millis serve: model failed to load: %s", self.load_error)
            return
        self.cold_start_s = perf_counter() - t0
        # one request's positions: the context, within the paged KV pool (an asked max_tokens past it: 400, not a cut)
        self.context = min(eng.max_seq, eng.kv.capacity) if eng.kv is not None else eng.max_seq
        self.gen_limits = gs.GenLimits(self.cfg.max_tokens, self.context, prompt_char_limit(eng.tok, eng.max_seq),
                                       # n choices are n rows: at most the slots, and the queue (more could never
                                       # be admitted: a 429 for ever)
                                       min(gs.MAX_N, eng.max_batch, self.cfg.max_queue), eng.config.vocab_size)
        self.engine, self._thread = eng, thread
        self._started.set()  # the engine thread goes on from opening to stepping
        m = self.metrics
        m.cold_start.set(self.cold_start_s)
        m.info.labels(self.name, f"{self.cfg.dtype}/{self.cfg.quant}", "millis.gen", "generate").set(1)
        m.ready.set(1)
        threading.Thread(target=_quietly, args=(lambda: eng.grammars,), daemon=True).start()  # for the first
        # structured request: llguidance's view of the vocabulary (~0.5 s), built after ready
        log.warning("millis serve: %s (generation, %d slots x %d positions%s) ready in %.2f s", self.name,
                    eng.max_batch, eng.max_seq, f"; paged KV: {eng.kv.capacity} positions" if eng.kv else "",
                    self.cold_start_s)

    def _engine_thread(self, opened: Future) -> None:
        try:
            eng = self._open()
        except Exception as e:  # noqa: BLE001 -- load() reports it
            if not opened.cancelled():
                opened.set_exception(e)
            return
        if opened.cancelled():  # shut down while it opened: nobody will step it
            return
        opened.set_result(eng)
        self._started.wait()  # until load() has published the engine (or close() gave up on it)
        if self.engine is not None:
            self._run()

    def _open(self):
        from millis.gen import SamplingParams

        eng = self.loader()
        self.chat.opened(eng)
        if self.cfg.warmup:  # one prefill and one decode before /ready
            bos = eng.config.bos_id or 0  # a config's bos_token_id may be no token of the model (GPT2Config's 50256)
            eng.add([bos if 0 <= bos < eng.config.vocab_size else 0], SamplingParams(max_tokens=2, ignore_eos=True))
            while eng.has_work:
                eng.step()
        return eng

    async def close(self) -> None:
        """After uvicorn has drained the connections: stop the worker (cancelling anything left)."""
        self.draining = self._closing = True
        for live in list(self.live.values()):
            self.cancel(live, "cancelled")
        self._wake.set()
        self._started.set()  # an engine thread still opening stops once it has (the process does not wait)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def expire_waiting(self) -> None:
        """Near the drain's limit every answer still running ends now, its slot freed: a 503, or a stream under way
        an error event and [DONE] (the server's exit cut such streams with neither: a client saw a broken body)."""
        self.draining = True
        for live in list(self.live.values()):
            self.cancel(live, "cancelled")
            live.queue.put_nowait(schemas.ApiError(503, "server is shutting down: the drain limit passed before this "
                                                        f"request's {'end' if live.t_first else 'first token'}",
                                                   code="shutting_down", headers={"Retry-After": "1"}))

    # ---- the engine loop (worker thread) -----------------------------------------------------
    def _run(self) -> None:
        eng, m = self.engine, self.metrics
        while True:
            self._wake.clear()  # before looking, so an add after the look still wakes us
            if not eng.has_work:
                if self._closing:
                    return
                self._wake.wait()
                continue
            t0 = perf_counter()
            try:
                outs = eng.step()
            except Exception as e:  # noqa: BLE001 -- a failed step fails its requests, not the server
                log.exception("millis serve: engine step failed")
                for rid in list(eng.requests):
                    eng.cancel(rid)
                self._post(self._fail_all, RequestFailed(f"generation failed: {type(e).__name__}: {e}"))
                continue
            t1 = perf_counter()
            m.on_step(eng, len(outs), t1 - t0)
            if outs:
                self._post(self._deliver, t1, outs)

    def _post(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- on the event loop -------------------------------------------------------------------
    def _deliver(self, t: float, outs: list) -> None:
        m = self.metrics
        for o in outs:
            live = self.live.get(o.id)
            if live is None:  # cancelled after the step produced it
                continue
            if o.finished == "error":  # this request failed in the step (no token: no latency to count)
                self._end(live, "error")
                live.queue.put_nowait(RequestFailed(f"generation failed for this request: {o.error}"))
                continue
            live.n_out += len(o.token_ids)
            m.on_tokens(len(o.token_ids))
            if live.t_first == 0.0:
                live.t_first = t
                m.on_ttft(t - live.t_submit)
            elif o.token_ids:
                m.on_itl(t - live.t_last, len(o.token_ids))
            live.t_last = t
            if o.finished:
                self._end(live, o.finished)
                if live.n_out > 1 and t > live.t_first:
                    m.tokens_per_s.observe((live.n_out - 1) / (t - live.t_first))
            live.queue.put_nowait(o)

    def _fail_all(self, exc: Exception) -> None:
        for live in list(self.live.values()):
            self._end(live, "error")
            live.queue.put_nowait(exc)

    def _end(self, live: Live, reason: str) -> None:
        live.done = True
        self.live.pop(live.id, None)
        self.metrics.finished.labels(reason).inc()
        self._request_s = 0.8 * self._request_s + 0.2 * (perf_counter() - live.t_submit)

    def cancel(self, live: Live, reason: str) -> None:
        """Free the request's slot now; nothing when it already ended."""
        if live.done:
            return
        self._end(live, reason)
        self.engine.cancel(live.id)
        self.metrics.running.set(self.engine.max_batch - self.engine.free_slots)

    # ---- one request -------------------------------------------------------------------------
    def require(self):
        if self.engine is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
            raise schemas.ApiError(503, msg, code="not_ready", headers={"Retry-After": "1"})
        return self.engine

    async def prompt_ids(self, g: gs.GenRequest) -> list[int]:
        if isinstance(g.prompt, list):
            return g.prompt
        if self.engine.tok is None:
            raise schemas.ApiError(400, "this model has no tokenizer: send the prompt as token ids to /v1/completions",
                                   param="prompt", code="no_tokenizer")
        if g.messages is not None and self.chat.template is None:
            where = "tokenizer.chat_template in the GGUF's metadata" if self.cfg.artifact.endswith(".gguf") else \
                "chat_template.jinja, nor chat_template in tokenizer_config.json"
            raise schemas.ApiError(400, f"model {self.name!r} has no chat template (no {where}): start the server "
                                        f"with --chat-template FILE, or use /v1/completions", param="messages",
                                   code="no_chat_template")
        if g.chars <= INLINE_TOKENIZE_CHARS:
            return self._encode(g)
        return await off_loop(self._encode, g)  # bounded: the text is at most gen_limits.max_prompt_chars

    def _encode(self, g: gs.GenRequest) -> list[int]:
        tok = self.engine.tok
        if g.messages is None:
            return tok.encode(g.prompt)
        try:
            text = self.chat.render(g)
        except Exception as e:  # noqa: BLE001 -- the template refused the conversation (raise_exception, ...)
            raise schemas.ApiError(422, f"the chat template cannot render these messages: {e}", param="messages",
                                   code="invalid_messages") from None
        try:  # a lone surrogate (an escaped one in tool-call arguments, parsed): not text a tokenizer takes
            text.encode()
        except UnicodeEncodeError as e:
            raise schemas.ApiError(422, f"the rendered conversation is not valid Unicode ({e.reason} at character "
                                        f"{e.start}): a lone surrogate escape in the messages?", param="messages",
                                   code="invalid_messages") from None
        return encode_rendered(tok, text)

    def admit(self, ids: list[int], params, chat: bool, n: int = 1, matchers: list | None = None) -> list[Live]:
        """n engine requests for one prompt (choice i seeded seed + i when a seed is given; its grammar's matcher
        `matchers[i]`, compiled off the loop), or none."""
        eng = self.require()
        if self.draining:
            raise schemas.ApiError(503, "server is shutting down", code="shutting_down", headers={"Retry-After": "1"})
        if len(eng.waiting) + n > self.cfg.max_queue:  # rows waiting to start, as the encoder server counts
            retry = max(1, math.ceil(self._request_s))
            raise schemas.ApiError(429, f"server busy: {len(eng.waiting)} requests waiting for a slot; retry "
                                        f"after {retry} s", code="overloaded", headers={"Retry-After": str(retry)})
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        lives = [Live(rid if i == 0 else f"{rid}-{i}", len(ids)) for i in range(n)]
        try:
            for i, live in enumerate(lives):
                seed = None if params.seed is None else (params.seed + i - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
                eng.add(ids, replace(params, seed=seed), id=live.id, matcher=matchers[i] if matchers else None)
                self.live[live.id] = live
        except MillisError as e:  # prompt too long for a slot, token ids out of range, ...
            for live in lives:
                self.cancel(live, "error") if live.id in self.live else None
            msg = str(e).replace("the prompt", "the prompt (messages)", 1) if chat else str(e)  # chat: no `prompt`
            code = "context_length_exceeded" if len(ids) >= self.context else "invalid_prompt"  # OpenAI's code:
            raise schemas.ApiError(400, msg, param="messages" if chat else "prompt", code=code) from None  # clients
            # (LangChain's ContextOverflowError) act on it
        self.metrics.prompt_tokens.inc(len(ids))
        self._wake.set()
        return lives

    async def next(self, live: Live, timeout: float | None = None):
        item = await (asyncio.wait_for(live.queue.get(), timeout) if timeout else live.queue.get())
        if isinstance(item, Exception):
            raise item
        return item


def _quietly(fn) -> None:
    with contextlib.suppress(Exception):  # e.g. a tokenizer llguidance cannot read: its requests get the 422
        fn()


def create_gen_app(cfg: ServeConfig, loader: Callable[[], Any]) -> Starlette:
    st = GenState(cfg, loader)

    async def generate(request: Request, chat: bool) -> Response:
        eng = st.require()
        body = await read_json(request, st.limits)
        g = gs.chat_request(body, st.name, st.gen_limits, st.chat.format, st.chat.tool_use_format) if chat else \
            gs.completion_request(body, st.name, st.gen_limits)
        matchers = None
        if g.params.grammar:  # compiled off the loop (1-1000 ms; the tokenizer's view the first time), one a choice
            try:
                async with st.compiles:
                    matchers = await off_loop(lambda: [eng.grammars.matcher(g.params.grammar) for _ in range(g.n)])
            except MillisError as e:
                raise schemas.ApiError(422, f"{g.grammar_from}: {e}", param=g.grammar_from,
                                       code="invalid_value") from None
        ids = await st.prompt_ids(g)
        gs.check_room(g, len(ids), st.context)
        lives = st.admit(ids, g.params, chat, g.n, matchers)

        def on_close(stream):
            return SSEResponse(stream, lambda: [st.cancel(live, "cancelled") for live in lives])

        try:
            return await respond(st, request, g, lives, chat, on_close)
        except RequestFailed as e:  # this request alone failed in the engine: its own answer
            raise failure_answer(g, e) from None

    def card() -> dict[str, Any]:
        c: dict[str, Any] = {"id": st.name, "object": "model", "created": st.started_at, "owned_by": "millis",
                             "task": "generate"}
        if st.engine is not None:
            c.update(max_model_len=st.context, slots=st.engine.max_batch, chat_template=st.chat.template is not None)
        return c

    async def health(request: Request) -> Response:
        eng = st.engine
        busy = {"running": eng.max_batch - eng.free_slots, "waiting": len(eng.waiting)} if eng is not None else {}
        return health_response(st, ready=eng is not None, cold_start_s=round(st.cold_start_s, 3), **busy)

    async def ready(request: Request) -> Response:
        return ready_response(st, st.engine is not None)

    async def metrics(request: Request) -> Response:
        if st.engine is not None:
            st.metrics.observe_engine(st.engine)
        data, ctype = st.metrics.render()
        return Response(data, 200, media_type=ctype)

    routes = [Route(path, endpoint(st, path, partial(generate, chat=chat)), methods=["POST"])
              for path, chat in (("/v1/completions", False), ("/v1/chat/completions", True))] + [
              *model_routes(st, card), Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), *tokenize_routes(st), *generation_live_routes(st)]
    return make_app(st, routes, lambda: openapi.generation_spec(
        st.name, st.gen_limits, st.engine.config.vocab_size if st.engine is not None else 0))


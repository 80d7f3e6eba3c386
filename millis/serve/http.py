"""What the encoder and the generation apps share on the HTTP side: reading a body within its
limit, running work off the event loop, answering every route's errors as OpenAI JSON, counting
every answer (unknown routes too), /ready, and the app's lifespan (background load, drain).

A request's state `st` has `cfg`, `metrics`, `limits`, `draining`, `load()` and `close()`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from time import perf_counter
from typing import Any, Awaitable, Callable

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from millis.common.rust_tokenizer import GIL_FREE_CHARS
from millis.serve import schemas

log = logging.getLogger("millis.serve")
INLINE_TOKENIZE_CHARS = GIL_FREE_CHARS  # above this a request is tokenized in a thread (and off the GIL)
UNMATCHED = "unmatched"       # the route label of answers to unknown paths and methods


class ClientGone(Exception):
    """The request was dropped before it finished (client disconnected or request timed out)."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, "application/json")


TEI_INVALID = 422  # TEI's routes answer a bad field 422 (OpenAI's: 400), and their errors in TEI's shape


def error_response(e: schemas.ApiError, tei: bool = False) -> Response:
    return Response(e.body(tei), e.status, e.headers, "application/json")


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes: from Content-Length
    before reading anything, else while it streams in (nothing past the limit is kept: uvicorn pauses
    reading while a chunk waits, so memory stays at the limit). A body not all in within `timeout_s` of the
    call (a client that stalls mid-body: uvicorn has no read timeout) is answered 408 and its chunks freed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise schemas.ApiError(413, f"request body is {declared} bytes (Content-Length); the limit is {limit}",
                               code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise schemas.ApiError(413, f"request body is over the limit of {limit} bytes",
                                           code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise schemas.ApiError(408, f"request body not received within {timeout_s:g} s ({size} bytes came)",
                               code="body_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


async def read_json(request: Request, limits: schemas.Limits) -> dict[str, Any]:
    """The body as a JSON object, within the body limit and the body's time (`read_body`)."""
    return schemas.parse_json(await read_body(request, limits.max_body_bytes, limits.body_timeout_s), limits)


OFF_LOOP_THREADS = max(2, os.cpu_count() or 2)  # off_loop's calls running at once; the next ones wait
OFF_LOOP_WAITING = 256  # calls waiting for one of those threads; past this a request is refused (429)
_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> [Semaphore, callers waiting]


async def off_loop(fn: Callable, *args) -> Any:
    """fn(*args) in a daemon thread of its own, awaited. Unlike asyncio.to_thread, a long call never
    holds up the process's exit (Python 3.11 joins the default executor's threads at shutdown);
    a caller that stops waiting (client gone) leaves the bounded call to finish alone. At most
    OFF_LOOP_THREADS run at once (a flood of large requests, tokenized before the queue's admission, used to
    start a thread each): the others wait their turn, and past OFF_LOOP_WAITING waiting the request is
    answered 429."""
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = [asyncio.Semaphore(OFF_LOOP_THREADS), 0]
    sem = gate[0]
    if sem.locked() and gate[1] >= OFF_LOOP_WAITING:
        raise schemas.ApiError(429, f"server busy: {gate[1]} large requests wait to be tokenized; retry shortly",
                               code="overloaded", headers={"Retry-After": "1"})
    gate[1] += 1
    try:
        await sem.acquire()
    finally:
        gate[1] -= 1
    fut = loop.create_future()

    def done(ok: bool, value: Any) -> None:
        sem.release()  # the thread has ended: the slot is free whether or not its caller still waits
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def work() -> None:
        try:
            result, ok = fn(*args), True
        except BaseException as e:  # noqa: BLE001 -- handed to the awaiting request
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(done, ok, result)

    try:
        threading.Thread(target=work, name="millis-offloop", daemon=True).start()
    except BaseException:  # no thread (the process's limit): the slot goes back, the request fails alone
        sem.release()
        raise
    return await fut


async def watch_disconnect(request: Request, job) -> None:
    """After the body is read, the next ASGI message is http.disconnect (client left or reply sent)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.drop(ClientGone("client disconnected"))


def count(st, route: str, status: int, t0: float) -> None:
    st.metrics.on_request(route, status, perf_counter() - t0)


# a request's inputs past the server's bounds (more texts than --max-inputs, a text over the length with --too-long
# reject): 413 in the code, answered as the route's API answers them (`api_status`)
TOO_MUCH = frozenset({"too_many_inputs", "text_too_long"})


def api_status(e: schemas.ApiError, invalid: int) -> int:
    """The status of an error on a route answering `invalid` for a bad field (400: OpenAI's and Cohere's routes,
    whose SDKs raise BadRequestError for a 400 only; 422: TEI's). OpenAI answers every bad input 400; TEI answers
    an empty input 400 and the rest (too many inputs, a text over the length) 422."""
    if e.status == 422 or (e.status == 413 and e.code in TOO_MUCH):
        return 400 if invalid == TEI_INVALID and e.code == "empty_input" else invalid
    return e.status


def endpoint(st, route: str, fn: Callable[[Request], Awaitable[Response]], invalid: int = 400):
    """Errors -> JSON error bodies with their status; every answer counted and timed. A client that
    leaves (mid-body or while waiting) is counted as 499, not logged as an error. A streamed answer is
    counted, timed and leaves "in flight" when its stream ends (Streamed). A bad input is answered as the
    route's API answers it (`api_status`), in its shape (TEI's routes: TEI's)."""
    tei = invalid == TEI_INVALID

    async def handler(request: Request) -> Response | Streamed:
        t0 = perf_counter()
        st.metrics.on_admit()

        def finish(status: int) -> None:
            st.metrics.on_done()
            count(st, route, status, t0)
        try:
            resp = await fn(request)
        except schemas.ApiError as e:
            e.status = api_status(e, invalid)
            resp = error_response(e, tei)
        except (ClientGone, ClientDisconnect):
            resp = Response(b"", 499)  # nobody reads it
        except Exception as e:  # noqa: BLE001 -- a bug or runtime failure: 500 with the reason, server lives
            log.exception("millis serve: %s failed", route)
            resp = error_response(schemas.ApiError(500, f"internal error: {type(e).__name__}: {e}"), tei)
        except asyncio.CancelledError:
            if not getattr(st, "draining", False):  # cancelled otherwise: no answer to count
                st.metrics.on_done()
                raise
            # the drain's limit passed while it ran (uvicorn cancels what is left, and answered a plain-text 500):
            # a JSON 503 instead, counted
            resp = error_response(schemas.ApiError(503, "server is shutting down: the drain limit passed before "
                                                        "this request was answered", code="shutting_down",
                                                   headers={"Retry-After": "1"}), tei)
        except BaseException:  # no answer to count
            st.metrics.on_done()
            raise
        if isinstance(resp, StreamingResponse):
            return Streamed(resp, finish)
        finish(resp.status_code)
        return resp
    return handler


class Streamed:
    """A streamed answer as an ASGI app that calls `finish(status)` when its stream ends: its status when
    the body ran to its end, 499 when it was cut (client gone, shutdown), 500 when sending it raised. Before,
    a stream was timed to its headers and left "in flight" while its tokens were still being sent."""

    def __init__(self, resp: StreamingResponse, finish: Callable[[int], None]):
        self.resp, self.finish, self.ended = resp, finish, False
        inner = resp.body_iterator

        async def body():
            try:
                async for chunk in inner:
                    yield chunk
                self.ended = True
            finally:
                if hasattr(inner, "aclose"):
                    await inner.aclose()
        resp.body_iterator = body()

    @property
    def status_code(self) -> int:
        return self.resp.status_code

    async def __call__(self, scope, receive, send) -> None:
        status = 499
        try:
            await self.resp(scope, receive, send)
            if self.ended:
                status = self.resp.status_code
        except Exception:
            status = 500
            raise
        finally:
            self.finish(status)


def model_routes(st, card: Callable[[], dict[str, Any]]) -> list[Route]:
    """OpenAI's GET /v1/models (a list of the one served model's card) and GET /v1/models/{id} (the card, or
    404 for another id), over `card()`: the served model's description now."""
    async def models(request: Request) -> Response:
        return json_response({"object": "list", "data": [card()]})

    async def model(request: Request) -> Response:
        schemas.check_model({"model": request.path_params["id"]}, st.name)
        return json_response(card())
    return [Route("/v1/models", endpoint(st, "/v1/models", models), methods=["GET"]),
            Route("/v1/models/{id:path}", endpoint(st, "/v1/models/{id}", model), methods=["GET"])]


def model_status(st, loaded: bool) -> str:
    """ready, loading, draining or failed: <why>."""
    if loaded and not st.draining:
        return "ready"
    return "draining" if st.draining else ("failed: " + st.load_error if st.load_error else "loading")


def health_response(st, **fields: Any) -> Response:
    """/health, with `fields` after its status: 200 while the server serves or will once its model is loaded (draining
    too); 503 once the model failed to load, which no wait mends (a liveness probe then restarts it; /ready alone
    left such a server up, answering 503 to everything, while /health said ok)."""
    if st.load_error:
        return json_response({"status": f"failed: {st.load_error}", **fields}, 503)
    return json_response({"status": "ok", **fields})


def ready_response(st, loaded: bool) -> Response:
    """/ready: 200 once the model is loaded and warmed, 503 while loading, failed or draining."""
    status = model_status(st, loaded)
    if status == "ready":
        return json_response({"status": "ready", "model": st.name, "cold_start_s": round(st.cold_start_s, 3)})
    return json_response({"status": status}, 503)


def make_app(st, routes: list[Route], spec: Callable[[], dict[str, Any]]) -> Starlette:
    """The Starlette app around a state `st`: the model loads in the background after start-up, so
    /health answers at once; /openapi.json serves `spec()` (it names what is loaded); unknown paths and
    methods get the OpenAI JSON error (404 / 405) and are counted; on shutdown admitted work finishes (a model
    still loading is given up: SIGTERM during a long load and warm-up exits at once)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        loading = asyncio.create_task(st.load())
        yield
        st.draining = True
        loading.cancel()  # a load still running is abandoned, not awaited: its thread is a daemon
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await st.close()

    async def openapi(request: Request) -> Response:
        return json_response(spec())

    async def unmatched(request: Request, exc: HTTPException) -> Response:
        t0 = perf_counter()
        if exc.status_code == 405:
            e = schemas.ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                 code="method_not_allowed", headers=dict(exc.headers or {}))
        else:
            e = schemas.ApiError(exc.status_code, f"no route {request.url.path}; see /openapi.json",
                                 code="not_found" if exc.status_code == 404 else None)
        count(st, UNMATCHED, e.status, t0)
        return error_response(e)

    app = Starlette(routes=routes + [Route("/openapi.json", openapi, methods=["GET"])], lifespan=lifespan,
                    exception_handlers={404: unmatched, 405: unmatched})
    app.state.millis = st
    return app

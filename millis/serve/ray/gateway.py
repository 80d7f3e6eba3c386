"""The HTTP ingress of a millis Ray Serve application: Ray's proxy hands it every request, and it
forwards each one whole to a replica through a deployment handle (as a stream when it asks for one: SSE passes through).

Why a gateway and not each replica's app behind Ray's proxy directly: the handle call carries the
prompt, which the prefix router (router.py) needs, and a replica that dies before it answered can be
retried here. A request that no replica started answering (it died, or was being replaced) is sent
again, up to RETRIES times: encoder requests are idempotent, and a generation request retried so
sent no token yet (an answer that does not stream is sent whole, so a lost one is asked again). A
stream that dies mid-answer ends at once: an SSE stream with an error event, a
body cut short otherwise; nothing waits on a dead replica.

Overload and waiting: the body is refused (413) past --max-body-bytes before it is read whole; requests
wait for a replica in the handle's queue, at most max_queued_requests of them (deploy.py), and past that
Ray's BackPressureError is answered 429 with Retry-After; a request's deadline (--request-timeout-s)
counts from its arrival here: no first answer by then (the whole answer, a stream's start, or for a
generation answered whole a replica taking it) is a 503 timeout, and the call is cancelled. A request whose
line and headers are over millis.serve.guard's MAX_HEAD_BYTES is answered 431 and not forwarded (Ray's proxy
has read it whole by then: only a reverse proxy in front bounds that).

/metrics is the gateway's own: every replica's series, each labelled with its replica (scrape.py), then the
gateway's.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from millis.serve import schemas
from millis.serve.guard import MAX_HEAD_BYTES
from millis.serve.encoder.tei_routes import TEI_PATHS
from millis.serve.http import Streamed, error_response, read_body
from millis.serve.ray.replica import Forwarded
from millis.serve.ray.scrape import every_replica, merged, missing_gauge

log = logging.getLogger("millis.serve.ray")
RETRIES = 3
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def generation_body(path: str, body: bytes) -> dict | None:
    """A generation request's JSON body, or None (another route, not a JSON object)."""
    if path not in GENERATION_ROUTES:
        return None
    try:
        b = orjson.loads(body)  # the replica's parser and limits: 1,024 levels of nesting, not a RecursionError
    except orjson.JSONDecodeError:
        return None
    return b if isinstance(b, dict) else None


def routing_prompt(b: dict | None, chars: int) -> str | None:
    """The first `chars` characters of a generation request's prompt (chat: the messages' texts in
    order, the system prompt first), or None (not generation, chars 0)."""
    if not chars or b is None:
        return None
    if isinstance(b.get("messages"), list):
        text = "".join(m["content"] for m in b["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str))
    else:
        text = b.get("prompt") if isinstance(b.get("prompt"), str) else ""
    return text[:chars] or None


def head_bytes(request: Request) -> int:
    """The size of the request's head as the client sent it: its line and its headers, each with its CRLF."""
    scope, query = request.scope, request.scope.get("query_string") or b""
    target = len(scope.get("raw_path") or scope["path"].encode()) + (1 + len(query) if query else 0)
    line = len(request.method) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2


def error(status: int, message: str, code: str, retry_after_s: float | None = None) -> schemas.ApiError:
    """A gateway's own error, answered (Gateway.own) as the single-process server answers it: in OpenAI's shape, in
    TEI's on TEI's routes; 429 and 503 say when to retry."""
    retry = max(1, math.ceil(retry_after_s or 1)) if status in (429, 503) else None
    return schemas.ApiError(status, message, code=code, headers={"Retry-After": str(retry)} if retry else None)


async def within(response, awaitable, deadline: float):
    """`awaitable` (a step of the handle call `response`) by the monotonic `deadline`; past it the call is
    cancelled (it leaves the handle's queue, or its replica) and TimeoutError raised."""
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        response.cancel()
        raise


async def gathered(answer) -> tuple[int, list, bytes]:
    """A streamed answer's rest as (status, headers, body): ("start", status, headers), then chunks."""
    status, headers, body = 502, [], []
    async for item in answer:
        if isinstance(item, tuple):
            _, status, headers = item
        else:
            body.append(item)
    return status, headers, b"".join(body)


class Gateway:
    """The ingress deployment class (decorated in deploy.py): `replicas` is the replicas' handle. It answers
    /health itself (a liveness probe must not wait in the replicas' queue), counts the answers it gives
    itself (413, 408, 429, 503...: the replicas never see those requests) on /metrics after the replicas'
    series, and drains on `drain()` (deploy.py calls it on SIGTERM, before the application is deleted)."""

    def __init__(self, replicas, max_body_bytes: int, prefix_chars: int, request_timeout_s: float = 30.0) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.replicas, self.max_body, self.chars = replicas, max_body_bytes, prefix_chars
        self.timeout_s = request_timeout_s
        self.inflight, self.draining = 0, False
        self.registry = CollectorRegistry()
        self.answered = Counter("millis_gateway_answers_total", "answers the Ray gateway gave itself (the request "
                                "reached no replica), by status", ["status"], registry=self.registry)
        self.cut = Counter("millis_gateway_streams_cut_total", "streams the gateway ended with an error event "
                           "because their replica call failed mid-answer, by error code", ["code"],
                           registry=self.registry)

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.forward, methods=METHODS)])

    async def drain(self, timeout_s: float) -> int:
        """Answer new requests 503 shutting_down, and wait (at most timeout_s) for the ones in flight to be
        answered whole (streams included): Ray's proxy and this gateway go with the application, so what they
        still carry must be done first. Returns the requests still in flight at the end."""
        self.draining = True
        end = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self.inflight

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        if self.draining:
            return self.own(error(503, "the server is shutting down", "shutting_down"), path)
        if (size := head_bytes(request)) > MAX_HEAD_BYTES:  # as the single-process server's guard answers it
            return self.own(error(431, f"the request's line and headers are {size} bytes; the limit is "
                                  f"{MAX_HEAD_BYTES}", "headers_too_large"), path)
        if request.method in ("GET", "HEAD") and request.url.path == "/health":
            return self.own(Response(orjson.dumps({"status": "ok", "gateway": True}),
                                     media_type="application/json"))
        self.inflight += 1
        streamed = False
        try:
            if request.method == "GET" and request.url.path == "/metrics":
                return await self.metrics()
            resp = await self.answer(request)
            if isinstance(resp, StreamingResponse):  # in flight until its stream ends
                streamed = True
                return Streamed(resp, self.answered_whole)
            return resp
        finally:
            if not streamed:
                self.inflight -= 1

    async def metrics(self) -> Response:
        """Every replica's series labelled replica="<id>" (those not answering in time left out and counted as
        missing), then the gateway's own."""
        answers, missing = await every_replica(self.replicas, "metrics_text")
        body = merged(answers) + generate_latest(self.registry) + missing_gauge(missing)
        return Response(body, media_type=CONTENT_TYPE_LATEST)  # what the replicas' own /metrics says

    def answered_whole(self, status: int) -> None:  # a stream has ended (Streamed's finish)
        self.inflight -= 1

    def own(self, resp: Response | schemas.ApiError, path: str = "") -> Response:
        """An answer of the gateway's own, counted on /metrics; an error in the shape of `path`'s API."""
        if isinstance(resp, schemas.ApiError):
            resp = error_response(resp, tei=path in TEI_PATHS)
        self.answered.labels(str(resp.status_code)).inc()
        return resp

    async def answer(self, request: Request) -> Response:
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + self.timeout_s  # the request's deadline counts from its arrival
        path = request.url.path
        try:
            # 413 before reading past the limit, 408 for a body not in by the request's timeout
            body = await read_body(request, self.max_body, self.timeout_s)
        except schemas.ApiError as e:
            return self.own(e, path)
        except ClientDisconnect:
            return self.own(Response(b"", 499))  # nobody reads it
        gen = generation_body(path, body)
        fwd = Forwarded(request.method, path, request.url.query.encode(),
                        [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP], body,
                        routing_prompt(gen, self.chars))
        if not (gen and gen.get("stream") is True):
            if gen is None:  # one round trip for an answer that does not stream: it is the first answer
                async def whole():
                    answer = self.replicas.call_whole.remote(fwd)
                    return await within(answer, answer, deadline)
            else:  # a generation answered whole may run past the deadline: the deadline covers the wait for a
                # replica to take it (its first item); the replica's own timeout then bounds its first token
                async def whole():
                    answer = self.replicas.options(stream=True).call.remote(fwd, True)
                    await within(answer, answer.__anext__(), deadline)
                    return await gathered(answer)
            got, failed = await self.ask(path, whole)
            if failed:
                return self.own(failed, path)
            status, headers, body = got
            resp = Response(body, status_code=status)
            resp.raw_headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
            return resp

        async def opened():  # the stream and its first item, ("start", status, headers)
            answer = self.replicas.options(stream=True).call.remote(fwd)
            return answer, await within(answer, answer.__anext__(), deadline)

        got, failed = await self.ask(path, opened)
        if failed:
            return self.own(failed, path)
        answer, (_, status, headers) = got
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

        async def rest():
            try:
                async for chunk in answer:
                    yield chunk
            except Exception as e:  # noqa: BLE001 -- the stream ends with the reason; only this request fails
                # a dead replica (RayActorError), or anything else the call raised mid-answer: either way the
                # client gets an error event and [DONE] (a stream that just stopped looked like a hang-up)
                died = isinstance(e, RayActorError)
                code = "replica_failed" if died else "replica_error"
                log.warning("millis gateway: replica call failed mid-answer on %s (%s)", path, type(e).__name__)
                self.cut.labels(code).inc()
                if sse:
                    what = "failed" if died else "raised on this request"
                    msg = {"error": {"message": f"the replica serving this request {what} ({type(e).__name__})",
                                     "type": "server_error", "param": None, "code": code}}
                    yield f"data: {json.dumps(msg)}\n\ndata: [DONE]\n\n".encode()

        resp = StreamingResponse(rest(), status_code=status)
        resp.raw_headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        return resp

    async def ask(self, path: str, start) -> tuple[object, schemas.ApiError | None]:
        """(what `start()` awaits to, None), sent again while its replica dies before answering; or
        (None, the error answer) when the replica raised, no replica answered, the replicas' queue is full
        (429) or the request's deadline passed (503)."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(RETRIES):
            try:
                return await start(), None
            except RayActorError as e:  # died before answering: nothing was sent, so send it again
                log.warning("millis gateway: replica failed before answering %s (%s); attempt %d of %d",
                            path, type(e).__name__, attempt + 1, RETRIES)
            except BackPressureError as e:  # max_queued_requests wait for a replica already: overloaded
                return None, error(429, f"server busy: {e.message}; retry shortly", "overloaded", e.retry_after_s)
            except TimeoutError:
                return None, error(503, f"not answered within {self.timeout_s:g} s", "timeout")
            except StopAsyncIteration:
                return None, error(502, "the replica closed the request without an answer", "bad_gateway")
            except Exception as e:  # noqa: BLE001 -- the replica raised: this request alone fails
                log.warning("millis gateway: %s failed on its replica: %s", path, e)
                return None, error(500, f"the replica failed on this request ({type(e).__name__})", "replica_error")
        return None, error(503, f"no replica answered after {RETRIES} attempts", "replicas_unavailable")

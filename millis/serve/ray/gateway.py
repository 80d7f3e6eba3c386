"""The HTTP ingress of a millis Ray Serve application: Ray's proxy hands it every request, and it
forwards each one whole to a replica through a deployment handle (as a stream when it asks for one: SSE passes through).

Why a gateway and not each replica's app behind Ray's proxy directly: the handle call carries the
prompt, which the prefix router (router.py) needs, and a replica that dies before it answered can be
retried here. A request that no replica started answering (it died, or was being replaced) is sent
again, up to RETRIES times: encoder requests are idempotent, and a generation request retried so
sent no token yet (an answer that does not stream is sent whole, so a lost one is asked again). A
stream that dies mid-answer ends at once: an SSE stream with an error event, a
body cut short otherwise; nothing waits on a dead replica.
"""
from __future__ import annotations

import json
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from millis.serve.ray.replica import Forwarded

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
        b = json.loads(body)
    except ValueError:
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


def error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                        status_code=status, headers={"Retry-After": "1"} if status == 503 else None)


class Gateway:
    """The ingress deployment class (decorated in deploy.py): `replicas` is the replicas' handle."""

    def __init__(self, replicas, max_body_bytes: int, prefix_chars: int) -> None:
        self.replicas, self.max_body, self.chars = replicas, max_body_bytes, prefix_chars

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.forward, methods=METHODS)])

    async def forward(self, request: Request) -> Response:
        from ray.exceptions import RayActorError

        body = await request.body()
        if len(body) > self.max_body:
            return error(413, f"request body over {self.max_body} bytes", "body_too_large")
        path = request.url.path
        gen = generation_body(path, body)
        fwd = Forwarded(request.method, path, request.url.query.encode(),
                        [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP], body,
                        routing_prompt(gen, self.chars))
        if not (gen and gen.get("stream") is True):  # one round trip for an answer that does not stream
            got, failed = await self.ask(path, lambda: self.replicas.call_whole.remote(fwd))
            if failed:
                return failed
            status, headers, body = got
            resp = Response(body, status_code=status)
            resp.raw_headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
            return resp

        async def opened():  # the stream and its first item, ("start", status, headers)
            answer = self.replicas.options(stream=True).call.remote(fwd)
            return answer, await answer.__anext__()

        got, failed = await self.ask(path, opened)
        if failed:
            return failed
        answer, (_, status, headers) = got
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)

        async def rest():
            try:
                async for chunk in answer:
                    yield chunk
            except RayActorError as e:
                log.warning("millis gateway: replica failed mid-answer on %s (%s)", path, type(e).__name__)
                if sse:
                    msg = {"error": {"message": f"the replica serving this request failed ({type(e).__name__})",
                                     "type": "server_error", "param": None, "code": "replica_failed"}}
                    yield f"data: {json.dumps(msg)}\n\ndata: [DONE]\n\n".encode()

        resp = StreamingResponse(rest(), status_code=status)
        resp.raw_headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        return resp

    async def ask(self, path: str, start) -> tuple[object, Response | None]:
        """(what `start()` awaits to, None), sent again while its replica dies before answering; or
        (None, the error answer) when the replica raised or no replica answered."""
        from ray.exceptions import RayActorError

        for attempt in range(RETRIES):
            try:
                return await start(), None
            except RayActorError as e:  # died before answering: nothing was sent, so send it again
                log.warning("millis gateway: replica failed before answering %s (%s); attempt %d of %d",
                            path, type(e).__name__, attempt + 1, RETRIES)
            except StopAsyncIteration:
                return None, error(502, "the replica closed the request without an answer", "bad_gateway")
            except Exception as e:  # noqa: BLE001 -- the replica raised: this request alone fails
                log.warning("millis gateway: %s failed on its replica: %s", path, e)
                return None, error(500, f"the replica failed on this request ({type(e).__name__})", "replica_error")
        return None, error(503, f"no replica answered after {RETRIES} attempts", "replicas_unavailable")

"""One Ray Serve replica: the single-process server's own app (encoder or generation), loaded in the
replica, driven in-process by the gateway's forwarded requests.

`Forwarded` is one HTTP request as the gateway passes it (its `prompt` is what the prefix router keys
on). `Replica.call` runs it through the app and yields ("start", status, headers) then body chunks as
the app sends them, so SSE streams through. The replica is up (Ray routes to it) only once its model
answers /ready; Ray's graceful shutdown runs the app's own drain (admitted requests finish).
A request whose caller went away (Ray cancels the call) is shown to the app as http.disconnect first, and
cancelled only if the app has not ended within DISCONNECT_GRACE_S: the app answers it 499 and counts it, as
the single-process server does (cancelled at once, it counted nothing).
`Replica.metrics_text` is what the gateway's /metrics asks every replica for (gateway.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field

READY_TIMEOUT_S = 600.0  # a model that does not load in this time fails the replica (Ray starts another)
REPLICA_HEADER = "x-millis-replica"  # which replica answered: "<Ray replica id> pid <process id>"
DISCONNECT_GRACE_S = 1.0  # how long an app whose caller left is given to see it go before it is cancelled


@dataclass
class Forwarded:
    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    prompt: str | None = None  # generation: the prompt's text (chat: the messages' contents), for routing


async def drive(app, req: Forwarded, gone: asyncio.Event, extra_headers: list[tuple[bytes, bytes]]):
    """Run `req` through the ASGI `app`: yields ("start", status, headers), then body chunks (bytes).
    The app sees the client leave when `gone` is set (the gateway's caller went away)."""
    out: asyncio.Queue = asyncio.Queue()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        out.put_nowait(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
             "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "query_string": req.query,
             "root_path": "", "headers": req.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda t: out.put_nowait({"type": "done", "task": t}))
    try:
        while True:
            m = await out.get()
            if m["type"] == "http.response.start":
                yield ("start", m["status"], list(m.get("headers", [])) + extra_headers)
            elif m["type"] == "http.response.body":
                if m.get("body"):
                    yield bytes(m["body"])
                if not m.get("more_body", False):
                    return
            elif m["type"] == "done":
                m["task"].result()  # the app's exception, if it raised before finishing the response
                return
    finally:
        gone.set()  # the app's receive() now answers http.disconnect
        await settle(task)


async def settle(task: asyncio.Task) -> None:
    """Let the app's `task` end on its own (it answers and counts a departed client 499 once it sees
    http.disconnect), at most DISCONNECT_GRACE_S; then cancel it."""
    if task.done():
        return
    try:
        await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
    finally:  # also when this call is cancelled again meanwhile: the app's task never outlives it
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def own_replica_id() -> str:
    """Ray Serve's id of the replica this runs in ("local" outside one: tests)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 -- outside a Serve replica
        return "local"


class Replica:
    """The deployment class (decorated with ray's serve.deployment in deploy.py)."""

    async def __init__(self, serve_fields: dict) -> None:
        from millis.serve.config import ServeConfig
        from millis.serve.server import app_and_loader

        cfg = ServeConfig(**serve_fields)
        factory, loader = app_and_loader(cfg)
        self.app = factory(cfg, loader)
        self.life = self.app.router.lifespan_context(self.app)
        await self.life.__aenter__()  # starts the model load in the background, as the server does
        self.replica_id = own_replica_id()
        self.name = f"{self.replica_id} pid {os.getpid()}"
        deadline, st = time.monotonic() + READY_TIMEOUT_S, self.app.state.millis
        while await self._status("/ready") != 200:  # Ray sends traffic only once __init__ returns
            if st.load_error:  # fail the replica at once, with the reason (Ray reports it and retries)
                raise RuntimeError(f"millis replica: {cfg.artifact} failed to load: {st.load_error}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"millis replica: {cfg.artifact} did not load within {READY_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)

    async def _status(self, path: str) -> int:
        async for item in drive(self.app, Forwarded("GET", path), asyncio.Event(), []):
            if isinstance(item, tuple):
                return item[1]
        return 500

    async def call(self, req: Forwarded, say_taken: bool = False):
        """The app's answer to `req` as ("start", status, headers) then body chunks (a streaming call).
        say_taken: first ("taken",) at once, so the gateway knows a replica has the request."""
        if say_taken:
            yield ("taken",)
        async for item in drive(self.app, req, asyncio.Event(), [(REPLICA_HEADER.encode(), self.name.encode())]):
            yield item

    async def call_whole(self, req: Forwarded) -> tuple[int, list, bytes]:
        """The app's whole answer to a request that does not stream: one round trip, not one per chunk."""
        status, headers, body = 500, [], []
        async for item in self.call(req):
            if isinstance(item, tuple):
                _, status, headers = item
            else:
                body.append(item)
        return status, headers, b"".join(body)

    async def metrics_text(self) -> tuple[str, bytes]:
        """(this replica's id, its app's /metrics text): the gateway's /metrics merges every replica's."""
        status, _, body = await self.call_whole(Forwarded("GET", "/metrics"))
        if status != 200:
            raise RuntimeError(f"millis replica: /metrics answered {status}")
        return self.replica_id, body

    async def check_health(self) -> None:  # Ray's periodic health check: the app still answers
        if await self._status("/health") != 200:
            raise RuntimeError("millis replica: /health is failing")

    async def __del__(self) -> None:  # Ray's graceful shutdown: the app drains admitted requests
        with contextlib.suppress(Exception):
            await self.life.__aexit__(None, None, None)

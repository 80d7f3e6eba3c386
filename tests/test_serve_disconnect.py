"""The encoder server, driven through its ASGI app: a client that leaves while its rows wait behind a busy
runtime is answered 499 (counted) once the watcher (started after WATCH_AFTER_S) sees it go, and its rows are
never run; a request answered sooner never starts a watcher."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from millis.artifact.model import open_model
from millis.serve.config import ServeConfig
from millis.serve.encoder import app as appmod

BODY = json.dumps({"model": "m", "inputs": ["where is my card?"]}).encode()
SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/v1/classify",
         "raw_path": b"/v1/classify", "query_string": b"", "root_path": "", "scheme": "http",
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}


async def request(app, leave_after_s: float | None = None) -> int:
    """One POST; leave_after_s: the client disconnects that long after sending its body. Returns the status."""
    done, sent, first = asyncio.Event(), [], [True]

    async def receive():
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": BODY, "more_body": False}
        if leave_after_s is not None:
            await asyncio.sleep(leave_after_s)
        else:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)
        if msg["type"] == "http.response.body" and not msg.get("more_body"):
            done.set()

    await app(dict(SCOPE), receive, send)
    return sent[0]["status"]


def test_a_client_leaving_while_queued_is_a_499_and_its_rows_never_run(monkeypatch):
    model = open_model("tiny:bert")
    calls: list[int] = []
    slow = {"on": False}

    def infer(model, rows, t):  # the runtime: slow once the server is ready, so the second request waits
        if slow["on"]:
            calls.append(len(rows))
            time.sleep(0.4)
        return np.zeros((len(rows), len(model.id2label)), np.float32)

    monkeypatch.setattr(appmod.State, "_infer", staticmethod(infer))
    watched: list[int] = []
    real_watch = appmod.watch_disconnect

    def counting_watch(request, job):  # the watcher tasks the app starts
        watched.append(1)
        return real_watch(request, job)

    monkeypatch.setattr(appmod, "watch_disconnect", counting_watch)
    app = appmod.create_app(ServeConfig(artifact="tiny:bert", model_name="m"), lambda: model, task="classify")

    async def main():
        lifespan: asyncio.Queue = asyncio.Queue()
        started = asyncio.Event()

        async def lsend(m):
            if m["type"] == "lifespan.startup.complete":
                started.set()

        await lifespan.put({"type": "lifespan.startup"})
        life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       lifespan.get, lsend))
        await started.wait()
        while await request(app) != 200:  # 503 until loaded and warmed
            await asyncio.sleep(0.02)
        before = len(watched)
        assert await request(app) == 200   # answered at once: no watcher task was started for it
        assert len(watched) == before
        slow["on"] = True
        first = asyncio.create_task(request(app))           # runs (0.4 s)
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        gone = await request(app, leave_after_s=0.01)       # queued behind it; its client leaves
        waited = time.perf_counter() - t0
        assert len(watched) == before + 2                   # both waited past WATCH_AFTER_S: both watch
        assert await first == 200
        await asyncio.sleep(0.05)
        await lifespan.put({"type": "lifespan.shutdown"})
        await life
        return gone, waited, app.state.millis.metrics.render()[0].decode()

    gone, waited, metrics = asyncio.run(main())
    assert gone == 499
    assert waited < 0.3, f"the departed client's answer waited {waited:.3f} s: the watcher did not start"
    assert calls == [1], f"runtime calls after ready (rows each): {calls}; the departed client's row ran"
    assert 'millis_requests_total{route="/v1/classify",status="499"} 1.0' in metrics

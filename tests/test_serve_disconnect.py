"""The encoder server, driven through its ASGI app: a client that leaves while its rows wait behind a busy
runtime is answered 499 (counted) once the watcher (started after WATCH_AFTER_S) sees it go, and its rows are
never run; a request answered sooner never starts a watcher. The wait for a tokenizer thread counts toward the
request timeout and is watched too; a shutdown during the model's load does not wait for it."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from millis.artifact.model import open_model
from millis.serve.config import ServeConfig
from millis.serve.encoder import app as appmod

BODY = json.dumps({"model": "m", "inputs": ["where is my card?"]}).encode()
SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/v1/classify",
         "raw_path": b"/v1/classify", "query_string": b"", "root_path": "", "scheme": "http",
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}


async def exchange(app, body: bytes = BODY, leave_after_s: float | None = None) -> tuple[int, bytes]:
    """One POST; leave_after_s: the client disconnects that long after sending its body. Returns the status
    and the answer's body."""
    done, sent, first = asyncio.Event(), [], [True]
    scope = dict(SCOPE, headers=[(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())])

    async def receive():
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": body, "more_body": False}
        if leave_after_s is not None:
            await asyncio.sleep(leave_after_s)
        else:
            await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)
        if msg["type"] == "http.response.body" and not msg.get("more_body"):
            done.set()

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def request(app, leave_after_s: float | None = None) -> int:
    return (await exchange(app, BODY, leave_after_s))[0]


def test_a_client_leaving_while_queued_is_a_499_and_its_rows_never_run(monkeypatch):
    model = open_model("tiny:bert")
    calls: list[int] = []
    slow = {"on": False}

    def infer(model, rows, t):  # the runtime: slow once the server is ready, so the second request waits
        if slow["on"]:
            calls.append(len(rows))
            time.sleep(3.0)  # far past the bound below: a watcher that did not start is no near miss
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
        lifespan, life = await started(app)
        while await request(app) != 200:  # 503 until loaded and warmed
            await asyncio.sleep(0.02)
        before = len(watched)
        assert await request(app) == 200   # answered at once: no watcher task was started for it
        assert len(watched) == before
        slow["on"] = True
        first = asyncio.create_task(request(app))           # runs (3 s)
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
    assert waited < 1.5, f"the departed client's answer waited {waited:.3f} s: the watcher did not start"
    assert calls == [1], f"runtime calls after ready (rows each): {calls}; the departed client's row ran"
    assert 'millis_requests_total{route="/v1/classify",status="499"} 1.0' in metrics


async def started(app) -> tuple[asyncio.Queue, asyncio.Task]:
    """The app's lifespan started: (its message queue, its task)."""
    lifespan: asyncio.Queue = asyncio.Queue()
    ready = asyncio.Event()

    async def lsend(m):
        if m["type"] == "lifespan.startup.complete":
            ready.set()

    await lifespan.put({"type": "lifespan.startup"})
    life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lifespan.get, lsend))
    await ready.wait()
    return lifespan, life


def test_waiting_for_a_tokenizer_thread_counts_toward_the_timeout_and_is_watched(monkeypatch):
    """Large inputs are tokenized in a thread (off_loop, at most OFF_LOOP_THREADS at once). A request waiting for
    one is answered 503 at its deadline (request_timeout_s from its arrival), or 499 once its client leaves,
    and its text is never tokenized."""
    from millis.serve import http

    model = open_model("tiny:bert")
    tokenized: list[int] = []
    real_token_ids = model.encoder.token_ids

    def recording(texts):
        tokenized.append(sum(map(len, texts)))
        return real_token_ids(texts)

    monkeypatch.setattr(model.encoder, "token_ids", recording)
    monkeypatch.setattr(appmod.State, "_infer",
                        staticmethod(lambda model, rows, t: np.zeros((len(rows), len(model.id2label)), np.float32)))
    monkeypatch.setattr(http, "OFF_LOOP_THREADS", 1)
    app = appmod.create_app(ServeConfig(artifact="tiny:bert", model_name="m", request_timeout_s=0.3), lambda: model,
                            task="classify")
    large = json.dumps({"model": "m", "inputs": ["where is my card " * 200]}).encode()  # 3,400 chars: off the loop

    async def main():
        lifespan, life = await started(app)
        while await request(app) != 200:  # 503 until loaded and warmed
            await asyncio.sleep(0.02)
        release = threading.Event()
        busy = asyncio.create_task(http.off_loop(release.wait, 3.0))  # the one tokenizer thread, taken
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        timed_out = await exchange(app, large)
        t1 = time.perf_counter()
        left = await exchange(app, large, leave_after_s=0.05)
        t2 = time.perf_counter()
        release.set()
        await busy
        await asyncio.sleep(0.1)
        await lifespan.put({"type": "lifespan.shutdown"})
        await life
        return timed_out, t1 - t0, left, t2 - t1

    (status, body), waited, (left, _), left_after = asyncio.run(main())
    assert status == 503 and json.loads(body)["error"]["code"] == "timeout", body
    assert waited < 1.0, f"answered after {waited:.2f} s: the wait for the tokenizer was not bounded"
    assert left == 499 and left_after < 1.0, (left, left_after)
    assert max(tokenized) < 3000, "a large text was tokenized after its request ended"


def test_shutdown_while_the_model_loads_does_not_wait_for_the_load():
    model = open_model("tiny:bert")
    release, returned = threading.Event(), threading.Event()

    def slow_loader():  # a long load (and warm-up)
        release.wait(5.0)
        returned.set()
        return model

    app = appmod.create_app(ServeConfig(artifact="tiny:bert", model_name="m"), slow_loader, task="classify")

    async def main():
        lifespan, life = await started(app)
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        await lifespan.put({"type": "lifespan.shutdown"})
        await life
        took = time.perf_counter() - t0
        release.set()  # the abandoned load ends in its daemon thread: nothing starts after it
        await asyncio.to_thread(returned.wait, 5.0)
        await asyncio.sleep(0.1)
        return took

    took = asyncio.run(main())
    st = app.state.millis
    assert took < 1.0, f"shutdown waited {took:.2f} s for the load"
    assert st.model is None and st.batcher is None and st.load_error is None


@pytest.mark.parametrize("kind", ["encoder", "generation"])
def test_health_fails_once_the_model_failed_to_load(kind):
    """A load that fails (the artifact's file gone, memory out) leaves a server no wait mends: /health says so (503),
    so a liveness probe restarts it, as /ready does; while loading /health is 200 and /ready 503."""
    from starlette.testclient import TestClient

    from millis.serve.generation.app import create_gen_app

    gate = threading.Event()

    def loader():
        gate.wait(10.0)
        raise OSError("model.gguf: No such file or directory")

    cfg = ServeConfig(artifact="x", model_name="m", warmup=False)
    app = appmod.create_app(cfg, loader, task="embed") if kind == "encoder" else create_gen_app(cfg, loader)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 503  # loading
        gate.set()
        deadline = time.time() + 10
        while client.get("/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.02)
        health = client.get("/health")
        assert health.status_code == 503 and "No such file" in health.json()["status"], health.text
        assert client.get("/ready").status_code == 503

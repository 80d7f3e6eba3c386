"""The Ray gateway (millis/serve/ray/gateway.py) driven through its ASGI app, with a stand-in for the replicas'
deployment handle (no cluster): body and head limits, 429 and timeouts, /health and the drain, /metrics merged
from every replica, and a stream whose replica call fails mid-answer."""
import asyncio
import json
import time

import pytest

from millis.serve.guard import MAX_HEAD_BYTES

pytestmark = pytest.mark.serve


@pytest.fixture
def with_ray():
    """Gateway.answer and /metrics import Ray's exception types: skip where Ray is not installed."""
    return pytest.importorskip("ray")


class FakeReplicas:
    """The replicas' deployment handle, without Ray: a call's answer is `answer(forwarded)`, awaited; with `stream`,
    a streaming call's items are `stream(forwarded)`'s (an async generator); /metrics's broadcast reaches `scrapes`
    (replica id -> its metrics text, an exception it raises, or None: it never answers)."""

    def __init__(self, answer, stream=None, scrapes=None):
        self.answer, self.stream, self.scrapes = answer, stream, scrapes or {}
        self.calls, self.cancelled = 0, 0

    @property
    def call_whole(self):
        return self

    @property
    def call(self):
        return self

    def options(self, stream: bool = False):
        return self

    def remote(self, fwd, say_taken: bool = False):
        self.calls += 1
        return FakeStream(self, self.stream(fwd)) if self.stream is not None else FakeResponse(self, fwd)

    def broadcast(self, method: str):
        assert method == "metrics_text"
        return FakeBroadcast(self.scrapes)


class FakeResponse:
    def __init__(self, replicas: FakeReplicas, fwd):
        self.replicas, self.fwd = replicas, fwd

    def __await__(self):
        return self.replicas.answer(self.fwd).__await__()

    def cancel(self):
        self.replicas.cancelled += 1


class FakeStream:
    def __init__(self, replicas: FakeReplicas, items):
        self.replicas, self.items = replicas, items

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.items.__anext__()

    def cancel(self):
        self.replicas.cancelled += 1


class FakeBroadcast:
    """Ray 2.60's DeploymentBroadcastResponse, as far as scrape.every_replica reads it."""

    def __init__(self, scrapes: dict):
        self.scrapes = scrapes

    async def _fetch_replica_results_async(self):
        return [FakeReplicaResult(rid, text) for rid, text in self.scrapes.items()]


class FakeReplicaResult:
    def __init__(self, rid: str, text):
        self.rid, self.text = rid, text

    async def get_async(self):
        if isinstance(self.text, BaseException):
            raise self.text
        if self.text is None:
            await asyncio.sleep(3600)
        return self.rid, self.text


def through_gateway(gateway, chunks: list[bytes], content_length: int | None = None, path: str = "/v1/embeddings",
                    method: str = "POST", headers: list[tuple[bytes, bytes]] = ()):
    """A request (POST /v1/embeddings) through the gateway's ASGI app, the body sent in `chunks`, with `headers`
    besides its content type: (status, headers, body, chunks the gateway read)."""
    heads = [(b"content-type", b"application/json"), *headers]
    if content_length is not None:
        heads.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": heads, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    read, sent = [0], []

    async def receive():
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(gateway.__serve_build_asgi_app__()(scope, receive, send))
    answer_heads = {k.decode().lower(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], answer_heads, b"".join(m.get("body", b"") for m in sent[1:]), read[0]


async def answered(fwd):
    return 200, [(b"content-type", b"application/json")], b'{"ok": true}'


def test_gateway_refuses_a_large_body_before_reading_it(with_ray):
    from millis.serve.ray.gateway import Gateway

    replicas = FakeReplicas(answered)
    gateway = Gateway(replicas, 100_000, 0, 5.0)
    chunk = b"x" * 65536
    status, _, body, read = through_gateway(gateway, [chunk] * 8, content_length=200 << 20)  # 200 MiB declared
    err = json.loads(body)["error"]
    assert status == 413 and read == 0, (status, read)  # nothing read: the declared size decides
    assert err["code"] == "body_too_large" and err["type"] == "invalid_request_error"
    status, _, body, read = through_gateway(gateway, [chunk] * 8)  # chunked: refused once past the limit
    assert status == 413 and read == 2 and json.loads(body)["error"]["code"] == "body_too_large", (status, read)
    assert replicas.calls == 0
    assert through_gateway(gateway, [b'{"input": "x"}'])[0] == 200


def test_gateway_answers_a_full_replica_queue_429(with_ray):
    from ray.serve.exceptions import BackPressureError

    from millis.serve.ray.gateway import Gateway

    async def queue_full(fwd):  # max_queued_requests wait for a replica already (deploy.replica_options)
        raise BackPressureError(num_queued_requests=128, max_queued_requests=128)

    status, headers, body, _ = through_gateway(Gateway(FakeReplicas(queue_full), 1 << 20, 0, 5.0), [b"{}"])
    assert status == 429 and int(headers["retry-after"]) >= 1, (status, body)
    assert json.loads(body)["error"]["code"] == "overloaded"


def test_gateway_bounds_the_wait_for_a_replica_by_the_request_timeout(with_ray):
    from millis.serve.ray.gateway import Gateway

    async def never_taken(fwd):  # waits in the handle's queue for a replica
        await asyncio.sleep(3.0)
        return await answered(fwd)

    replicas = FakeReplicas(never_taken)
    t0 = time.perf_counter()
    status, headers, body, _ = through_gateway(Gateway(replicas, 1 << 20, 0, 0.2), [b"{}"])
    waited = time.perf_counter() - t0
    assert status == 503 and json.loads(body)["error"]["code"] == "timeout" and headers["retry-after"] == "1", body
    assert waited < 1.5 and replicas.cancelled == 1, (waited, replicas.cancelled)



def test_the_gateway_answers_health_itself_counts_its_own_answers_and_drains(with_ray):
    from millis.serve.ray.gateway import Gateway

    async def slow(fwd):  # a replica taking 0.3 s
        await asyncio.sleep(0.3)
        return await answered(fwd)

    gateway = Gateway(FakeReplicas(slow), 100, 0, 5.0)
    status, _, body, _ = through_gateway(gateway, [b"{}"], path="/health", method="GET")
    assert status == 200 and json.loads(body)["status"] == "ok" and gateway.replicas.calls == 0  # never queued
    assert through_gateway(gateway, [b"x" * 200])[0] == 413  # the gateway's own answer: no replica saw it

    gateway.replicas.scrapes = {"r1": b"# TYPE millis_requests_total counter\nmillis_requests_total 1.0\n"}
    status, _, body, _ = through_gateway(gateway, [b""], path="/metrics", method="GET")
    assert status == 200 and b'millis_requests_total{replica="r1"} 1.0' in body
    assert b'millis_gateway_answers_total{status="413"} 1.0' in body  # it counted nowhere

    async def drained():
        task = asyncio.create_task(asyncio.to_thread(through_gateway, gateway, [b"{}"]))
        await asyncio.sleep(0.1)
        left = await gateway.drain(5.0)  # waits for the request in flight, which is answered whole
        return left, await task
    left, (status, _, body, _) = asyncio.run(drained())
    assert left == 0 and status == 200 and json.loads(body) == {"ok": True}
    status, headers, body, _ = through_gateway(gateway, [b"{}"])
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down" and "retry-after" in headers


def test_gateway_reads_generation_bodies_as_the_replica_does():
    """50,000 nested brackets (100 KB, under the body limit) were a RecursionError in the gateway: a plain-text 500
    that never reached a replica. orjson refuses them as the replica does (its 400 invalid_json)."""
    from millis.serve.ray.gateway import generation_body

    assert generation_body("/v1/completions", b"[" * 50000) is None
    assert generation_body("/v1/completions", b'{"prompt": "hi"}') == {"prompt": "hi"}
    assert generation_body("/v1/completions", b"NaN") is None and generation_body("/v1/embeddings", b"{}") is None


def replica_metrics(n: int) -> bytes:
    """A replica's /metrics text: a labelled counter (a route with braces in it) and a histogram."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    Counter("millis_requests_total", "answers", ["route", "status"], registry=reg).labels("/v1/models/{id}",
                                                                                          "200").inc(n)
    Histogram("millis_request_seconds", "latency", registry=reg).observe(0.01 * n)
    return generate_latest(reg)


def test_metrics_are_every_replicas_series_labelled_by_replica(with_ray, monkeypatch):
    """/metrics was one replica's series, picked by the router at each scrape and unlabelled: Prometheus saw
    counters jump between replicas (resets). Now every replica's, labelled; a replica not answering in time is
    left out and counted."""
    from prometheus_client.parser import text_string_to_metric_families

    from millis.serve.ray import scrape
    from millis.serve.ray.gateway import Gateway

    monkeypatch.setattr(scrape, "SCRAPE_TIMEOUT_S", 0.2)
    replicas = FakeReplicas(answered, scrapes={"r1": replica_metrics(1), "r2": replica_metrics(2),
                                               "r3": None, "r4": RuntimeError("replica gone")})
    t0 = time.perf_counter()
    status, headers, body, _ = through_gateway(Gateway(replicas, 1 << 20, 0, 5.0), [b""], path="/metrics",
                                               method="GET")
    took = time.perf_counter() - t0
    assert status == 200 and headers["content-type"].startswith("text/plain") and replicas.calls == 0
    assert took < 1.5, f"a replica that never answers held the scrape {took:.2f} s"
    text = body.decode()
    assert text.count("# TYPE millis_requests_total counter") == 1 and text.count("# HELP millis_request_seconds ") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {s.labels["replica"]: (s.value, s.labels["route"]) for s in families["millis_requests"].samples
              if s.name == "millis_requests_total"}
    assert counts == {"r1": (1.0, "/v1/models/{id}"), "r2": (2.0, "/v1/models/{id}")}
    assert {s.labels["replica"] for s in families["millis_request_seconds"].samples} == {"r1", "r2"}
    assert families["millis_metrics_replicas_missing"].samples[0].value == 2.0  # r3 late, r4 failed
    assert "millis_gateway_answers" in families
    assert scrape.labelled("up 1.0", 'replica="a"') == 'up{replica="a"} 1.0'


def test_the_stand_in_reads_what_ray_has():
    """scrape.every_replica reads Ray's broadcast results one by one (the stand-in above mimics that)."""
    pytest.importorskip("ray")
    from ray.serve.handle import DeploymentBroadcastResponse, DeploymentHandle

    assert hasattr(DeploymentHandle, "broadcast")
    assert hasattr(DeploymentBroadcastResponse, "_fetch_replica_results_async")


def test_gateway_refuses_a_head_over_the_limit_431(with_ray):
    """Ray's proxy has no head bound (the single-process server answers 431 past MAX_HEAD_BYTES): the gateway
    forwarded any head to a replica."""
    from millis.serve.ray.gateway import Gateway

    replicas = FakeReplicas(answered)
    gateway = Gateway(replicas, 1 << 20, 0, 5.0)
    status, _, body, read = through_gateway(gateway, [b"{}"], headers=[(b"x-big", b"a" * MAX_HEAD_BYTES)])
    err = json.loads(body)["error"]
    assert status == 431 and err["code"] == "headers_too_large" and str(MAX_HEAD_BYTES) in err["message"]
    assert replicas.calls == 0 and read == 0
    assert through_gateway(gateway, [b"{}"], headers=[(b"x-ok", b"a" * 8000)])[0] == 200


def test_a_stream_whose_call_raises_mid_answer_ends_with_an_error_event(with_ray):
    """Only a dead replica (RayActorError) was caught mid-stream: anything else ended the SSE stream with no error
    event and no [DONE]."""
    from millis.serve.ray.gateway import Gateway

    async def failing(fwd):
        yield ("start", 200, [(b"content-type", b"text/event-stream")])
        yield b'data: {"choices": []}\n\n'
        raise ValueError("a bug in the call")

    gateway = Gateway(FakeReplicas(answered, stream=failing), 1 << 20, 0, 5.0)
    status, _, body, _ = through_gateway(gateway, [b'{"prompt": "hi", "stream": true}'], path="/v1/completions")
    events = [ln[6:] for ln in body.decode().split("\n") if ln.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]", body
    assert json.loads(events[-2])["error"]["code"] == "replica_error" and gateway.inflight == 0
    _, _, metrics, _ = through_gateway(gateway, [b""], path="/metrics", method="GET")
    assert b'millis_gateway_streams_cut_total{code="replica_error"} 1.0' in metrics


def test_the_gateways_own_errors_on_tei_routes_are_in_teis_shape(with_ray):
    """huggingface_hub and TEI's clients read `error` as the message: the gateway's own 429 / 413 / 503 on a TEI route
    are TEI's object, as the replica's own errors there; on OpenAI's routes OpenAI's."""
    from ray.serve.exceptions import BackPressureError

    from millis.serve.ray.gateway import Gateway

    async def queue_full(fwd):
        raise BackPressureError(num_queued_requests=128, max_queued_requests=128)

    gateway = Gateway(FakeReplicas(queue_full), 100, 0, 5.0)
    for path in ("/embed", "/rerank", "/"):
        status, headers, body, _ = through_gateway(gateway, [b"{}"], path=path)
        err = json.loads(body)
        assert status == 429 and err["error_type"] == "overloaded" and isinstance(err["error"], str), (path, body)
        assert err["code"] == "overloaded" and int(headers["retry-after"]) >= 1
    status, _, body, _ = through_gateway(gateway, [b"x" * 200], path="/predict")
    assert status == 413 and json.loads(body)["error_type"] == "validation", body
    status, _, body, _ = through_gateway(gateway, [b"{}"], path="/v1/rerank")  # Cohere's route: OpenAI's shape
    assert status == 429 and json.loads(body)["error"]["code"] == "overloaded"


def test_tei_paths_are_the_routes_answered_in_teis_shape():
    """The gateway's list of TEI's paths is what the encoder server routes to TEI's handlers (GET / and /ping, the
    probes, answer no errors)."""
    from millis.serve.encoder.tei_routes import TEI_PATHS, tei_routes

    posted = []

    def post(path, fn, invalid=400):
        posted.append(path)
        return path

    routes = tei_routes(None, None, None, None, post, None, None)
    got = {r if isinstance(r, str) else r.path for rs in routes.values() for r in rs
           if isinstance(r, str) or r.path == "/info"}
    assert got == set(posted) | {"/info"} == TEI_PATHS

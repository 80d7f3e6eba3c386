"""`millis serve --replicas 2` on a local Ray instance (Ray Serve): a tiny encoder and a tiny decoder,
2 replicas of 1 thread each. Answers equal the single-process server's; both replicas get traffic;
SSE streams through Ray's proxy; a shared prompt prefix stays on one replica; a replica killed under
load loses no encoder request and comes back; a generation stream on a killed replica ends at once
with an error event; SIGTERM leaves no Ray process behind. Also the router's hashing, the config's
checks and the emitted Serve config, without a cluster. The gateway's own tests, with a stand-in for the
replicas' handle: test_serve_ray_gateway.py; start-up, `serve deploy` args and the replica's disconnect:
test_serve_ray_hardening.py."""
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf
from test_serve import Server

from millis.common.errors import MillisError
from millis.gen.config import LlamaConfig
from millis.loadgen.process import ServerProcess, serve_command
from millis.serve.ray.config import RayConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.serve
TEXTS = ["where is my card?", "I was charged twice", "how do I top up?", "reset my PIN please"]
DECODER = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=1024, hidden_dim=128,
                      norm_eps=1e-5, rope_theta=10000.0)


def ray_processes() -> set[int]:
    """Pids of Ray's own processes (GCS, raylet, workers) on this machine."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray/core/src/ray" in cmd or cmd.startswith(b"ray::"):
            out.add(int(pid))
    return out


class RayServer(ServerProcess):
    def __init__(self, model, *flags: str):
        super().__init__(serve_command(model, "--threads", "1", "--replicas", "2", *flags), ready_timeout=240)


def replica_of(headers: dict) -> tuple[str, int]:
    name, _, pid = headers["x-millis-replica"].partition(" pid ")
    return name, int(pid)


@pytest.fixture(scope="module")
def before():
    return ray_processes()


@pytest.fixture(scope="module")
def encoder(before):
    s = RayServer("tiny:bert", "--max-queue", "256")
    yield s
    assert s.stop() == 0
    time.sleep(2)
    assert not ray_processes() - before, "Ray processes left behind"


def test_encoder_replicas_answer_as_one_process(encoder):
    single = Server("tiny:bert")
    try:
        seen = set()
        for text in TEXTS * 3:
            status, headers, got = encoder.post("/v1/classify", {"input": [text]})
            assert status == 200, got
            seen.add(replica_of(headers)[0])
            _, _, want = single.post("/v1/classify", {"input": [text]})
            assert got["data"][0]["label"] == want["data"][0]["label"]
            assert abs(got["data"][0]["score"] - want["data"][0]["score"]) < 1e-5
        assert len(seen) == 2  # both replicas took requests
        status, _, err = encoder.post("/v1/classify", {"input": 5})
        assert status == 400 and err["error"]["param"] == "input"
    finally:
        assert single.stop() == 0


def test_killed_replica_loses_no_encoder_request(encoder):
    _, headers, _ = encoder.post("/v1/classify", {"input": ["x"]})
    name, pid = replica_of(headers)
    stop, statuses = threading.Event(), []

    def client():
        while not stop.is_set():
            statuses.append(encoder.post("/v1/classify", {"input": TEXTS})[0])

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)  # the replica's process dies with requests in flight
        time.sleep(3.0)
        stop.set()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    deadline, names = time.time() + 30, set()
    while time.time() < deadline and len(names - {name}) < 2:  # Ray starts a new replica in its place
        names.add(replica_of(encoder.post("/v1/classify", {"input": ["x"]})[1])[0])
    assert len(names - {name}) == 2, names


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, before):
    path = tmp_path_factory.mktemp("ray") / "tiny.gguf"
    write_tiny_gguf(str(path), DECODER, random_llama_tensors(DECODER, "Q8_0", embed_qtype="Q8_0"))
    s = RayServer(path, "--max-tokens", "64")
    yield s, path
    assert s.stop() == 0


def stream_events(server, body: dict) -> tuple[dict, list[dict]]:
    status, headers, raw = server.request("POST", "/v1/chat/completions", {**body, "stream": True})
    assert status == 200, raw
    lines = [ln[6:] for ln in raw.decode().split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return headers, [json.loads(ln) for ln in lines[:-1]]


def test_generation_streams_and_shares_prefixes(decoder):
    server, path = decoder
    system = {"role": "system", "content": "You are a careful bank assistant. " * 12}
    body = {"messages": [system, {"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
    status, headers, whole = server.post("/v1/chat/completions", body)
    assert status == 200, whole
    single = Server(path)
    try:
        assert single.post("/v1/chat/completions", body)[2]["choices"][0]["message"] == \
            whole["choices"][0]["message"]  # greedy: the same text as one process
    finally:
        assert single.stop() == 0
    _, events = stream_events(server, body)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == \
        whole["choices"][0]["message"]["content"]
    owner = replica_of(headers)[0]
    for q in ("where is my card?", "fees?", "top up", "PIN"):  # one system prompt: one replica's prefix cache
        h = server.post("/v1/chat/completions", {**body, "messages": [system, {"role": "user", "content": q}]})[1]
        assert replica_of(h)[0] == owner
    spread = {replica_of(server.post("/v1/completions", {"prompt": f"story {i}: once", "max_tokens": 2})[1])[0]
              for i in range(16)}
    assert len(spread) == 2  # different prompts spread over both


def test_generation_on_a_killed_replica_fails_fast(decoder):
    """A stream whose replica dies mid-answer ends within 2 s with an error event and [DONE]."""
    server, _ = decoder
    c = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        c.request("POST", "/v1/completions", json.dumps({"prompt": "once", "max_tokens": 900, "ignore_eos": True,
                                                         "stream": True}), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: ")
        os.kill(replica_of({k.lower(): v for k, v in r.getheaders()})[1], signal.SIGKILL)
        t0 = time.time()
        rest = r.read()
        assert time.time() - t0 < 2.0
    finally:
        c.close()
    assert b'"code": "replica_failed"' in rest and rest.rstrip().endswith(b"data: [DONE]")


def test_sigterm_answers_the_requests_in_flight_then_exits_0(decoder):
    """Serve's shutdown took Ray's proxy and the gateway down at once: every request in flight was cut
    (RemoteDisconnected), though the replicas drained. Now the gateway drains first. Runs last on `decoder`."""
    server, _ = decoder
    body = {"prompt": "once", "max_tokens": 900, "ignore_eos": True}
    started, done = threading.Barrier(5), []

    def ask(stream: bool) -> None:
        c = http.client.HTTPConnection(server.host, server.port, timeout=120)
        try:
            c.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}),
                      {"Content-Type": "application/json"})
            if not stream:
                started.wait(60)  # sent: its answer comes whole
            r = c.getresponse()
            first = r.readline() if stream else b""
            if stream:
                started.wait(60)  # its first event is in
            rest = first + r.read()
            whole = rest.rstrip().endswith(b"data: [DONE]") if stream else \
                json.loads(rest)["usage"]["completion_tokens"] == 900
            done.append((r.status, whole))
        except Exception as e:  # noqa: BLE001 -- counted as lost
            done.append((type(e).__name__, False))
        finally:
            c.close()

    threads = [threading.Thread(target=ask, args=(k % 2 == 0,)) for k in range(4)]
    for t in threads:
        t.start()
    started.wait(60)  # the streams have begun; the whole answers are being written
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert done == [(200, True)] * 4, done
    assert server.proc.wait(120) == 0


def test_router_hashing_is_stable():
    from millis.serve.ray.router import ranked

    class R:
        def __init__(self, uid):
            self.replica_id = type("Id", (), {"unique_id": uid})()

    reps = [R(u) for u in ("a", "b", "c")]
    owners = {k: ranked(k, reps)[0].replica_id.unique_id for k in (f"prompt {i}" for i in range(60))}
    assert set(owners.values()) == {"a", "b", "c"}
    assert owners == {k: ranked(k, list(reversed(reps)))[0].replica_id.unique_id for k in owners}
    without_c = {k: ranked(k, reps[:2])[0].replica_id.unique_id for k in owners}
    assert all(without_c[k] == v for k, v in owners.items() if v != "c")  # only c's keys move


def test_ray_config_and_emitted_serve_config(tmp_path):
    from millis.serve.config import ServeConfig
    from millis.serve.ray.deploy import ray_config_text

    for bad in ("3:1", "\u00b2:3", "\u0661:\u0663", "1:", ":2", " 1:2"):  # superscript and Arabic-Indic digits too
        with pytest.raises(MillisError, match="MIN:MAX"):
            RayConfig(autoscale=bad)
    assert RayConfig(autoscale="0:3").scale_range() == (0, 3)
    assert not RayConfig().wanted and RayConfig(replicas=2).wanted
    with pytest.raises(MillisError, match="--replicas and --autoscale"):  # replicas was ignored silently
        RayConfig(replicas=3, autoscale="1:4")
    with pytest.raises(MillisError, match="--target-ongoing is read by --autoscale only"):
        RayConfig(replicas=2, target_ongoing=5.0)
    assert RayConfig(autoscale="1:4", target_ongoing=5.0).target_ongoing == 5.0
    text = ray_config_text(ServeConfig(artifact="tiny:bert", threads=1), RayConfig(autoscale="1:4"))
    app = json.loads(text)["applications"][0]
    assert app["import_path"] == "millis.serve.ray.deploy:build" and app["route_prefix"] == "/"
    assert app["args"] == {"serve": {"artifact": "tiny:bert", "threads": 1}, "ray": {"autoscale": "1:4"}}


def test_replica_options_bound_the_queue_at_the_gateway():
    from ray import serve

    from millis.serve.config import ServeConfig
    from millis.serve.ray.deploy import application, replica_options
    from millis.serve.ray.replica import Replica

    cfg = ServeConfig(artifact="tiny:bert", threads=1, max_queue=80, max_batch=8, request_timeout_s=7.0)
    rc = RayConfig(replicas=2)
    replica = serve.deployment(Replica, name="millis-replica", **replica_options(cfg, rc, gen=False))  # Ray takes them
    # Ray counts a request as queued while it probes the replicas too: the bound holds both replicas' room and
    # the queue (max_queue alone answered bursts below the replicas' room 429)
    assert replica.max_queued_requests == 2 * 88 + 80 and replica.max_ongoing_requests == 88
    assert replica_options(cfg, RayConfig(autoscale="0:3"), gen=False)["max_queued_requests"] == 3 * 88 + 80
    application(cfg, rc)  # the whole application binds without a cluster


def test_a_deployment_the_cluster_cannot_place_is_refused():
    from millis.serve.config import ServeConfig
    from millis.serve.ray.deploy import check_resources

    check_resources(ServeConfig(artifact="x", threads=1), RayConfig(replicas=2), {"CPU": 2.0})
    with pytest.raises(MillisError, match="3 CPUs wanted"):
        check_resources(ServeConfig(artifact="x", threads=1), RayConfig(replicas=3), {"CPU": 2.0})
    with pytest.raises(MillisError, match="1 GPUs wanted .*--device cuda.* has 0"):  # Ray waited for ever
        check_resources(ServeConfig(artifact="x", threads=1, device="cuda"), RayConfig(replicas=1), {"CPU": 2.0})


def test_on_a_cluster_that_runs_serve_already_only_millis_is_removed(tmp_path):
    """Joining a cluster whose Serve runs other applications (--ray-address): Serve's own port stands (millis
    printed the one it asked for), and SIGTERM deletes millis's application only (serve.shutdown() removed
    every application on the cluster)."""
    from ray import serve

    from millis.serve.config import ServeConfig
    from millis.serve.ray.deploy import APP_NAME, running_serve, stop_app

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Other:
        async def __call__(self, request):
            return "other"

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert running_serve() is None
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        joined = running_serve()
        assert joined is not None and isinstance(joined.http_config.port, int)
        serve.run(Other.bind(), name="other", route_prefix="/other")
        serve.run(Other.bind(), name=APP_NAME, route_prefix="/")
        stop_app(serve, ServeConfig(artifact="x", shutdown_timeout_s=2.0), joined=True)  # no gateway: deleted as is
        assert set(serve.status().applications) == {"other"}
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_replicas_own_load_error_is_what_the_start_says():
    from millis.serve.ray.deploy import own_reason

    ray_says = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
                "ray::ServeReplica:millis:millis-replica.initialize_and_get_metadata() (pid=1)\n"
                "RuntimeError: Traceback (most recent call last):\n  File \"replica.py\", line 90\n"
                "RuntimeError: millis replica: m.gguf failed to load: MillisError: model d.gguf does not exist")
    assert own_reason(ray_says) == "millis replica: m.gguf failed to load: MillisError: model d.gguf does not exist"
    assert own_reason("no replica could be placed") == "no replica could be placed"

"""`millis serve` on Ray, without a cluster: start-up stopped by SIGTERM or failing removes what it deployed
(stand-ins for the `ray` and `ray.serve` modules record the calls), a local run starts its own Ray instance,
`serve deploy`'s args are read strictly, --head-timeout-s is refused, and a replica shows its app a departed
caller before cancelling it (the app counts the 499)."""
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest
from test_serve_disconnect import BODY, started

from millis.common.errors import MillisError
from millis.serve.config import ServeConfig
from millis.serve.ray import deploy
from millis.serve.ray.config import RayConfig

pytestmark = pytest.mark.serve


class FakeServe(types.ModuleType):
    """`ray.serve` as serve_on_ray calls it: `run` does `starting()` (the replicas loading, or failing)."""

    def __init__(self, starting):
        super().__init__("ray.serve")
        self.starting, self.calls = starting, []

    def start(self, **kwargs):
        self.calls.append("start")

    def run(self, app, **kwargs):
        self.calls.append("run")
        self.starting()

    def delete(self, name):
        self.calls.append(("delete", name))

    def shutdown(self):
        self.calls.append("shutdown")

    def status(self):  # deploy_failure: nothing more to say
        raise RuntimeError("no status")

    def get_deployment_handle(self, *args, **kwargs):  # stop_app's drain: no gateway here
        raise RuntimeError("no gateway")


class FakeRay(types.ModuleType):
    def __init__(self, serve: FakeServe):
        super().__init__("ray")
        self.serve, self.inits, self.shutdowns = serve, [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def cluster_resources(self):
        return {"CPU": 8.0}

    def shutdown(self):
        self.shutdowns += 1


class ClusterServe:
    """The client of a Serve instance the cluster ran before millis joined it (deploy.running_serve)."""
    http_config = types.SimpleNamespace(host="127.0.0.1", port=8123)


def on_fake_ray(monkeypatch, starting, joined: bool) -> FakeRay:
    fake = FakeRay(FakeServe(starting))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.serve", fake.serve)
    monkeypatch.setattr(deploy, "application", lambda cfg, rc: "the application")
    monkeypatch.setattr(deploy, "running_serve", lambda: ClusterServe() if joined else None)
    return fake


@contextlib.contextmanager
def ray_driver_handlers():
    """SIGTERM and SIGINT as Ray's driver leaves them after ray.init (sys.exit(15)), restored after."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def ray_exits(signum, frame):
        sys.exit(signum)
    for sig in before:
        signal.signal(sig, ray_exits)
    try:
        yield ray_exits
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def loading_until_stopped():
    """serve.run while the replicas load (serve.run waits for them, up to READY_TIMEOUT_S)."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        time.sleep(0.05)
    raise AssertionError("the SIGTERM did not stop the start-up")


@pytest.mark.parametrize("joined", [True, False])
def test_sigterm_during_start_up_removes_the_application_and_exits_0(monkeypatch, joined):
    """The signal handlers were installed only once serve.run returned: Ray's own exited 15 and left the
    application deployed on a joined cluster."""
    fake = on_fake_ray(monkeypatch, loading_until_stopped, joined)
    rc = RayConfig(replicas=2, ray_address="auto" if joined else "")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    with ray_driver_handlers() as ray_exits:
        timer.start()
        try:
            status = deploy.serve_on_ray(ServeConfig(artifact="x", port=0 if joined else 8000), rc)
        finally:
            timer.cancel()
        assert signal.getsignal(signal.SIGTERM) is ray_exits  # put back as it was
    assert status == 0
    assert fake.serve.calls == ["start", "run", ("delete", "millis") if joined else "shutdown"], fake.serve.calls
    assert fake.shutdowns == 1


def test_a_start_up_that_fails_removes_the_application(monkeypatch):
    def failing():
        raise RuntimeError("Failed to update the deployments")

    fake = on_fake_ray(monkeypatch, failing, joined=True)
    with ray_driver_handlers(), pytest.raises(MillisError, match="the replicas did not start: Failed to update"):
        deploy.serve_on_ray(ServeConfig(artifact="x", port=0), RayConfig(replicas=2, ray_address="auto"))
    assert fake.serve.calls == ["start", "run", ("delete", "millis")]  # the cluster's other apps stay


def test_a_local_run_starts_its_own_ray_and_sigterm_after_start_up_drains(monkeypatch):
    """address=None joined any cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster named."""
    fake = on_fake_ray(monkeypatch, lambda: None, joined=False)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    with ray_driver_handlers():
        timer.start()
        status = deploy.serve_on_ray(ServeConfig(artifact="x", shutdown_timeout_s=1.0), RayConfig(replicas=1))
    assert status == 0 and fake.inits[0]["address"] == "local"
    assert fake.serve.calls == ["start", "run", "shutdown"]


def test_serve_deploy_args_are_read_strictly(monkeypatch):
    """ServeConfig(**args) ignored a misspelt key and took prefix_chars 2.5, which then failed every generation
    request with a TypeError (a plain-text 500)."""
    built = []
    monkeypatch.setattr(deploy, "application", lambda cfg, rc: built.append((cfg, rc)))
    cfg, rc = ServeConfig(artifact="m.gguf", threads=2, shutdown_timeout_s=5.0), RayConfig(autoscale="1:4")
    deploy.build(json.loads(deploy.ray_config_text(cfg, rc))["applications"][0]["args"])  # what millis writes
    assert built == [(cfg, rc)]
    for args, says in (({"rays": {"replicas": 2}}, "unknown key 'rays'"),
                       ({"serve": {"artifact": "x", "max_qeue": 3}}, "no field 'max_qeue'"),
                       ({"serve": {"artifact": "x"}, "ray": {"prefix_chars": 2.5}}, "'ray.prefix_chars' should be "
                                                                                     "an integer"),
                       ({"serve": {"artifact": "x", "max_batch": "8"}}, "'serve.max_batch' should be an integer"),
                       ({"serve": {"artifact": "x", "head_timeout_s": 5}}, "--head-timeout-s"),
                       (["serve"], "should be an object")):
        with pytest.raises(MillisError, match=says):
            deploy.build(args)


def test_head_timeout_is_refused_on_ray(tmp_path):
    """Ray's proxy reads the heads: --head-timeout-s was silently not applied."""
    cfg = ServeConfig(artifact="x", head_timeout_s=5.0)
    for rc in (RayConfig(replicas=2), RayConfig(emit_ray_config=str(tmp_path / "serve.json"))):
        with pytest.raises(MillisError, match="--head-timeout-s cannot be applied on Ray Serve"):
            deploy.serve_on_ray(cfg, rc)
    assert not (tmp_path / "serve.json").exists()


def test_a_caller_leaving_a_replica_is_counted_499(monkeypatch):
    """Ray cancels a replica's call when its client leaves: the app was cancelled in the same step as it was told,
    and counted nothing (the single-process server counts a 499)."""
    from millis.artifact.model import open_model
    from millis.serve.encoder import app as appmod
    from millis.serve.ray.replica import Forwarded, Replica

    model = open_model("tiny:bert")
    slow = {"on": False}

    def infer(model, rows, t):  # the runtime: slow once the server is ready, so the second request waits
        if slow["on"]:
            time.sleep(0.4)
        return np.zeros((len(rows), len(model.id2label)), np.float32)

    monkeypatch.setattr(appmod.State, "_infer", staticmethod(infer))

    class LocalReplica(Replica):
        def __init__(self, app):  # Replica's own loads the artifact itself, inside Ray's replica context
            self.app, self.name, self.replica_id = app, "r1 pid 1", "r1"

        def __del__(self):  # Ray awaits Replica's (the app's drain): here the lifespan below ends the app
            pass

    replica = LocalReplica(appmod.create_app(ServeConfig(artifact="tiny:bert", model_name="m"), lambda: model,
                                             task="classify"))
    fwd = Forwarded("POST", "/v1/classify", b"", [(b"content-type", b"application/json")], BODY)

    async def main():
        lifespan, life = await started(replica.app)
        while (await replica.call_whole(fwd))[0] != 200:  # 503 until loaded and warmed
            await asyncio.sleep(0.02)
        slow["on"] = True
        first = asyncio.create_task(replica.call_whole(fwd))  # runs (0.4 s)
        await asyncio.sleep(0.05)
        left = asyncio.create_task(replica.call_whole(fwd))  # queued behind it
        await asyncio.sleep(0.1)
        left.cancel()  # what Ray does when the caller has gone
        with contextlib.suppress(asyncio.CancelledError):
            await left
        assert (await first)[0] == 200
        _, text = await replica.metrics_text()
        await lifespan.put({"type": "lifespan.shutdown"})
        await life
        return text.decode()

    metrics = asyncio.run(main())
    assert 'millis_requests_total{route="/v1/classify",status="499"} 1.0' in metrics


def test_a_port_in_use_is_one_clear_line_before_ray_starts():
    """`serve --replicas 2` on a port in use printed a 45-line traceback a minute later, from Ray's own bind."""
    import socket

    import pytest

    from millis.common.errors import MillisError
    from millis.serve.ray.deploy import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MillisError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again: no error

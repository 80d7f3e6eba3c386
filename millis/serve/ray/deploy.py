"""`serve_on_ray(cfg, ray_cfg)`: the same `millis serve` as a Ray Serve application.

    Ray's HTTP proxy -> millis-gateway (1 replica, no CPU reserved; gateway.py)
                     -> millis-replica x N (each its own model and engine; replica.py)

Each replica reserves `--threads` CPUs (Ray's num_cpus; num_gpus 1 with --device cuda) and runs the
single-process server's app: the same routes, OpenAI shapes, admission (429), metrics and drain. Ray sends a
replica at most max_queue + max_batch requests at once; past that, requests wait in the gateway's handle
queue (max_queued_requests: what all replicas take at once plus max_queue), and the next ones are answered
429 (gateway.py). On SIGTERM the gateway drains first (new requests 503, those in flight answered), then the
application is deleted; on a cluster whose Serve ran already (--ray-address) its port stands and its other
applications stay. SIGTERM/SIGINT during start-up (the replicas loading) stops it too, and exits 0; start-up
failing or stopped removes what it had deployed (a joined cluster keeps nothing of it).
`--replicas N` fixes the count; `--autoscale MIN:MAX` lets Ray scale on ongoing requests per replica.
Generation replicas are chosen by router.PrefixRouter (a shared prompt prefix stays on one replica's
prefix cache), encoders by Ray's default (power of two choices). `--emit-ray-config FILE` writes the
config `serve deploy FILE` takes (its import path is `build` below) and exits.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import socket
import threading
from pathlib import Path

from millis.common.errors import MillisError
from millis.common.schema import from_dict
from millis.serve.config import ServeConfig
from millis.serve.ray.config import RayConfig

APP_NAME = "millis"
BUILD_PATH = "millis.serve.ray.deploy:build"
QUIET_LOGS = {"log_level": "WARNING", "enable_access_log": False}  # no log line per request (ms each here)
SHUTDOWN_GRACE_S = 10.0  # past the drain limit, this long for Serve's own shutdown before giving up on it


def is_generation(cfg: ServeConfig) -> bool:
    """Checks the artifact as `millis serve` does (a bad one fails here, before anything deploys)."""
    from millis.serve.generation.app import create_gen_app
    from millis.serve.server import app_and_loader

    return app_and_loader(cfg)[0] is create_gen_app


def replica_options(cfg: ServeConfig, rc: RayConfig, gen: bool) -> dict:
    """The replica deployment's Ray Serve options."""
    from ray.serve.config import RequestRouterConfig

    most = rc.scale_range()[1] if rc.autoscale else rc.replicas or 1
    opts: dict = {"ray_actor_options": {"num_cpus": cfg.threads or 1, "num_gpus": 1 if cfg.device == "cuda" else 0},
                  "max_ongoing_requests": cfg.max_queue + cfg.max_batch,  # the replica's own 429 decides past this
                  # requests no replica has taken yet wait in the gateway's handle; past this many: 429, not an
                  # unbounded wait (Ray's BackPressureError, answered in gateway.ask). Ray counts a request there
                  # while it probes the replicas' queues too, so the bound holds what all replicas take at once
                  # besides the queue (max_queue alone refused bursts below the replicas' room)
                  "max_queued_requests": most * (cfg.max_queue + cfg.max_batch) + cfg.max_queue,
                  "graceful_shutdown_timeout_s": cfg.shutdown_timeout_s, "health_check_period_s": 5.0,
                  "logging_config": QUIET_LOGS}
    if rc.autoscale:
        lo, hi = rc.scale_range()
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": rc.target_ongoing}
    else:
        opts["num_replicas"] = rc.replicas or 1
    if gen and rc.prefix_chars:
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="millis.serve.ray.router:PrefixRouter")
    return opts


def application(cfg: ServeConfig, rc: RayConfig):
    """The bound Ray Serve application (gateway over replicas) for `cfg`."""
    from ray import serve

    from millis.serve.ray.gateway import Gateway
    from millis.serve.ray.replica import Replica

    gen = is_generation(cfg)
    replica = serve.deployment(Replica, name="millis-replica", **replica_options(cfg, rc, gen))
    gateway = serve.deployment(serve.ingress()(Gateway), name="millis-gateway", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1 << 16,
                               logging_config=QUIET_LOGS)
    fields = {**dataclasses.asdict(cfg), "threads": cfg.threads or 1}
    return gateway.bind(replica.bind(fields), cfg.max_body_bytes, rc.prefix_chars if gen else 0,
                        cfg.request_timeout_s)


def build(args: dict):
    """What `serve deploy` imports (the emitted config's import_path): args {"serve": {...}, "ray": {...}},
    read strictly: an unknown key or a value of the wrong type fails here, naming it (ServeConfig(**args) ignored
    a misspelt "rays", and took prefix_chars 2.5, which then failed every generation request)."""
    where = f"the args of {BUILD_PATH}"
    if not isinstance(args, dict):
        raise MillisError(f"{where} should be an object with \"serve\" and \"ray\", got {type(args).__name__}")
    if unknown := sorted(set(args) - {"serve", "ray"}):
        raise MillisError(f"{where}: unknown key {unknown[0]!r} (only \"serve\" and \"ray\")")
    cfg = from_dict(ServeConfig, args.get("serve", {}), where, "serve", strict=True)
    rc = from_dict(RayConfig, args.get("ray", {}), where, "ray", strict=True)
    check_ray_mode(cfg)
    return application(cfg, rc)


def check_ray_mode(cfg: ServeConfig) -> None:
    """Refuse what Ray Serve would silently not do: --head-timeout-s bounds millis's own HTTP listener, and on
    Ray the listener is Ray's proxy (uvicorn, which Serve sets up with no head timeout)."""
    default = next(f.default for f in dataclasses.fields(ServeConfig) if f.name == "head_timeout_s")
    if cfg.head_timeout_s != default:
        raise MillisError("--head-timeout-s cannot be applied on Ray Serve: Ray's HTTP proxy reads the request "
                          "heads and has no such bound (leave the flag out; put a reverse proxy with a header "
                          "timeout in front)")


def ray_config_text(cfg: ServeConfig, rc: RayConfig) -> str:
    """A Serve config file (JSON, which YAML readers take) deploying `build` with these settings."""
    changed = lambda c: {f.name: getattr(c, f.name) for f in dataclasses.fields(c)  # noqa: E731
                         if getattr(c, f.name) != f.default and f.name != "emit_ray_config"}
    return json.dumps({"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port or 8000},
                       "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": BUILD_PATH,
                                         "args": {"serve": changed(cfg), "ray": changed(rc)}}]}, indent=2)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """The port a local Serve will bind, in use: one clear line now (Ray failed a minute later, with a traceback)."""
    from millis.serve.server import bound_socket

    bound_socket(host, port).close()


def serve_on_ray(cfg: ServeConfig, rc: RayConfig) -> int:
    """Deploy, print the address, serve until SIGTERM/SIGINT, then drain and remove the application
    (`stop_app`) and leave Ray. Returns the exit status."""
    check_ray_mode(cfg)
    if rc.emit_ray_config:
        Path(rc.emit_ray_config).write_text(ray_config_text(cfg, rc) + "\n")
        print(f"millis serve: wrote {rc.emit_ray_config} (deploy it with `serve deploy {rc.emit_ray_config}`)")
        return 0
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MillisError("serving on Ray needs Ray Serve: pip install 'millis[ray]'") from None
    if cfg.port and not rc.ray_address:  # a Serve of its own binds it (a cluster's keeps its settings: start_app)
        check_port(cfg.host, cfg.port)
    app = application(cfg, rc)
    # "local": an instance of its own, as the flag says (None joined any cluster RAY_ADDRESS or the last
    # `ray start` on this machine named)
    ray.init(address=rc.ray_address or "local", include_dashboard=False, log_to_driver=False,
             logging_level=cfg.log_level.upper())
    signals = Signals()  # from here: Ray's own driver handler exited 15 and left the application deployed
    try:
        try:
            joined, port = start_app(ray, serve, app, cfg, rc, signals)
        except StopSignal:
            print("millis serve: stopped during start-up (what was deployed is removed)", flush=True)
            return 0
        host = joined.http_config.host if joined is not None else cfg.host
        print(f"millis serve: listening on http://{host}:{port} (Ray Serve, "
              f"{rc.autoscale or rc.replicas or 1} replicas, each loaded before it takes requests)", flush=True)
        while not signals.stop.wait(0.5):  # a timed wait: the signal handler runs between waits
            pass
        print("millis serve: stopping (requests in flight are answered first)", flush=True)
        # Bounded: a signal sent to the whole process group (not just this process) has already killed Ray's
        # own processes
        done = threading.Thread(target=stop_app, args=(serve, cfg, joined is not None), daemon=True)
        done.start()
        done.join(2 * cfg.shutdown_timeout_s + SHUTDOWN_GRACE_S)
        return 0 if not done.is_alive() else 1
    finally:
        ray.shutdown()
        signals.restore()


class StopSignal(BaseException):
    """SIGTERM or SIGINT during start-up (a BaseException: no `except Exception` on the way swallows it)."""


class Signals:
    """SIGTERM and SIGINT, handled from ray.init on. During start-up (`starting`) they raise StopSignal wherever
    the start waits (serve.run waits for the replicas to load, up to READY_TIMEOUT_S); after it they set `stop`."""

    def __init__(self) -> None:
        self.stop, self.starting = threading.Event(), True
        self.before = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum, frame) -> None:
        self.stop.set()
        if self.starting:
            self.starting = False  # raised once: a second signal does not interrupt the clean-up
            raise StopSignal(signum)

    def restore(self) -> None:
        for sig, handler in self.before.items():
            signal.signal(sig, handler)


def start_app(ray, serve, app, cfg: ServeConfig, rc: RayConfig, signals: Signals):
    """Start Serve (unless the cluster runs its own) and the application: returns (the cluster's own Serve client
    or None, the HTTP port). Anything raised once something was deployed (a stop signal, the replicas failing to
    load) first removes it (`remove_app`, bounded), then goes on: ray.shutdown() alone leaves a joined cluster
    running the application."""
    check_resources(cfg, rc, ray.cluster_resources())
    joined = running_serve()  # a cluster's own Serve: its HTTP settings stand, and its other apps stay
    port = joined.http_config.port if joined is not None else cfg.port or free_port(cfg.host)
    if joined is not None and cfg.port and cfg.port != port:
        raise MillisError(f"the Ray cluster's Serve listens on port {port} already; --port {cfg.port} cannot "
                          f"be used there (leave it out, or give {port})")
    placed = joined is None  # a Serve started here is shut down whole; a cluster's own keeps all but millis
    try:
        serve.start(http_options={"host": cfg.host, "port": port}, logging_config=QUIET_LOGS)
        placed = True
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # noqa: BLE001 -- Ray says "Failed to update the deployments": say why
            raise MillisError(f"the replicas did not start: {deploy_failure(serve) or e}") from None
        signals.starting = False  # up: a signal from now on asks to stop (inside this try: none is lost)
    except BaseException:
        signals.starting = False  # a second signal only asks to stop: the removal runs to its end
        if placed:
            removed_within(cfg.shutdown_timeout_s + SHUTDOWN_GRACE_S, serve, joined is not None)
        raise
    return joined, port


def removed_within(timeout_s: float, serve, joined: bool) -> bool:
    """remove_app in a daemon thread, waited for at most timeout_s (with Ray's processes gone, its calls wait for
    ever). What it raises is printed, not raised: the error that made it run is the one to report."""
    def run() -> None:
        try:
            remove_app(serve, joined)
        except Exception as e:  # noqa: BLE001
            print(f"millis serve: removing the application failed: {type(e).__name__}: {e}", flush=True)
    done = threading.Thread(target=run, daemon=True)
    done.start()
    done.join(timeout_s)
    return not done.is_alive()


def check_resources(cfg: ServeConfig, rc: RayConfig, have: dict) -> None:
    """Refuse a deployment the cluster cannot place (Ray would wait for the resources for ever)."""
    replicas = rc.scale_range()[0] if rc.autoscale else rc.replicas or 1
    for name, each, flag in (("CPU", cfg.threads or 1, "--threads"), ("GPU", 1 if cfg.device == "cuda" else 0,
                                                                       "--device cuda")):
        if each * replicas > have.get(name, 0):
            raise MillisError(f"{each * replicas:g} {name}s wanted for the replicas ({flag} x replicas); the Ray "
                              f"cluster has {have.get(name, 0):g}")


def running_serve():
    """The client of the Serve instance already running on the cluster joined, or None."""
    try:
        from ray.serve.context import _get_global_client  # noqa: PLC2701 -- Ray has no public "is Serve up"

        return _get_global_client()
    except Exception:  # noqa: BLE001 -- RayServeException: none runs
        return None


def deploy_failure(serve) -> str:
    """What Ray says of the application's deployments that failed (a replica's load error, with its reason)."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001
        return ""
    if app is None:
        return ""
    msgs = [f"{name}: {own_reason(d.message)}" for name, d in app.deployments.items() if d.message]
    return "; ".join(msgs) or app.message


def own_reason(message: str) -> str:
    """A replica's own reason ("millis replica: ... failed to load: ...") out of Ray's message and traceback."""
    lines = [ln[ln.index("millis replica:"):] for ln in message.splitlines() if "millis replica:" in ln]
    return lines[-1] if lines else message


def stop_app(serve, cfg: ServeConfig, joined: bool) -> None:
    """SIGTERM: the gateway drains (new requests 503; those in flight, streams too, answered within
    shutdown_timeout_s: Ray's proxy goes with the app), then the app is deleted (the replicas drain too), and
    Serve itself shut down unless it was the cluster's own (its other applications stay)."""
    try:
        gateway = serve.get_deployment_handle("millis-gateway", app_name=APP_NAME)
        gateway.drain.remote(cfg.shutdown_timeout_s).result(timeout_s=cfg.shutdown_timeout_s + SHUTDOWN_GRACE_S)
    except Exception:  # noqa: BLE001 -- a gateway already gone: delete what is left
        pass
    remove_app(serve, joined)


def remove_app(serve, joined: bool) -> None:
    """The application off the cluster: on a cluster whose Serve ran before millis joined it, the application
    alone (its other applications stay); else Serve, started by millis, shut down with it."""
    if joined:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()

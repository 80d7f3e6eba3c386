"""`serve(cfg)`: bind, print the address, run uvicorn until SIGTERM/SIGINT, drain, exit 0."""
from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from millis.errors import MillisError
from millis.serve.config import ServeConfig


def _loader(cfg: ServeConfig):
    """Check the artifact now (a bad path fails before binding); load it later, in the app.
    Returns (app factory, loader): the encoder app, or the generation app for a decoder."""
    from millis import artifact
    from millis.api import open_model
    from millis.serve.app import create_app

    p = Path(cfg.artifact)
    if not cfg.artifact:
        raise MillisError("millis serve needs an artifact directory (or MILLIS_ARTIFACT)")
    if p.exists() and artifact.format_of(p) == artifact.FORMAT:
        artifact.read_meta(p, verify=True)  # format version and file hashes, before we bind
    elif not p.exists() and ":" not in cfg.artifact:
        raise MillisError(f"{p} does not exist (expected an artifact directory written by `millis optimize`, "
                          f"or a decoder: HF llama/mistral/qwen2/gpt2 directory or llama2.c checkpoint)")
    elif p.exists():
        from millis.serve.generation import create_gen_app, is_generation_model

        if is_generation_model(p):
            from millis.gen import EngineConfig, open_engine

            engine = EngineConfig(max_batch=cfg.max_batch, max_seq=cfg.max_seq, dtype=cfg.dtype, quant=cfg.quant,
                                  threads=cfg.threads, device=cfg.device)  # a bad setting fails before binding
            return create_gen_app, lambda: open_engine(cfg.artifact, engine)
    # ORT keeps its default spinning thread pool: measured here, turning it off (so idle threads sleep)
    # cost ~2 ms at concurrency 1 and lowered throughput under load (bench/serve_vs_infinity.py notes)
    return create_app, lambda: open_model(cfg.artifact, threads=cfg.threads, device=cfg.device,
                                          max_batch=cfg.max_batch)


def serve(cfg: ServeConfig, loader=None) -> int:
    """Serve `cfg.artifact` over HTTP; returns the exit status (0 after a graceful drain)."""
    from millis.serve.app import create_app

    factory, loader = (create_app, loader) if loader is not None else _loader(cfg)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise MillisError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    sock.listen(2048)  # from here on connections wait in the backlog, none is refused while uvicorn starts
    host, port = sock.getsockname()[:2]
    app = factory(cfg, loader)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on", access_log=False,
                            log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_timeout_s,
                            timeout_keep_alive=30, backlog=2048)
    server = _Server(config)
    print(f"millis serve: listening on http://{host}:{port} (model loads in the background; GET /ready)",
          flush=True)
    server.run(sockets=[sock])
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """SIGTERM/SIGINT mean 'drain and exit 0'. (uvicorn's own handler re-raises the signal after
    shutdown, so the process would die with status 143 even after a clean drain.)"""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True
        print(f"millis serve: {signal.Signals(sig).name}: draining admitted requests", file=sys.stderr, flush=True)

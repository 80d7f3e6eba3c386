"""`serve(cfg)`: bind, print the address, run uvicorn until SIGTERM/SIGINT, drain, exit 0."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn

from millis.common.errors import MillisError
from millis.common.files import raise_fd_limit
from millis.serve.config import ServeConfig
from millis.serve.guard import FD_RESERVE, guarded_protocol


def app_and_loader(cfg: ServeConfig):
    """Check the artifact now (anything wrong fails before binding, with the message `millis.load`
    gives); load it later, in the app. Returns (app factory, loader): the encoder app (publishing
    only its task's route when the task is known), or the generation app for a decoder."""
    from functools import partial

    from millis.artifact import store as artifact
    from millis.artifact.model import open_model
    from millis.encoder.source import built_pooling
    from millis.serve.encoder.app import create_app

    from millis.gen.builtin import BUILTIN_MODELS, resolve_model

    if cfg.artifact.startswith("builtin:") and cfg.artifact.removeprefix("builtin:") in BUILTIN_MODELS:
        return _gen_loader(cfg, resolve_model(cfg.artifact))
    p = Path(cfg.artifact)
    if not cfg.artifact:
        raise MillisError("millis serve needs an artifact directory (or MILLIS_ARTIFACT)")
    task = ""
    if artifact.is_artifact(p):
        meta = artifact.read_meta(p, verify=True)  # format, version, hashes; or why not
        task = meta.task
        built_pooling(p, meta.source.pooling.mode, cfg.pooling)  # (before binding, as the rest)
    elif not p.exists() and ":" not in cfg.artifact:
        raise MillisError(f"{p} does not exist (expected an artifact directory written by `millis optimize`, "
                          f"or a decoder: a GGUF file, a HF llama/mistral/qwen2/gpt2 directory or a llama2.c "
                          f"checkpoint)")
    elif p.exists():
        from millis.serve.generation.models import is_generation_model

        if is_generation_model(p) and not (cfg.pooling and p.is_dir()):  # (--pooling: a folder served as an embedder)
            if cfg.pooling:
                raise MillisError(f"--pooling {cfg.pooling}: {p} is a chat model's file (GGUF, llama2.c), not an "
                                  f"embedder's folder")
            return _gen_loader(cfg, cfg.artifact)
        if p.is_dir() and not (p / "config.json").exists():
            artifact.read_meta(p)  # raises: not an artifact (no millis.json), build one with `millis optimize`
    if not task:  # a source model served as torch fp32: resolve it now (a bad spec fails before binding)
        from millis.encoder.source import resolve, with_pooling

        task = "classify" if with_pooling(resolve(cfg.artifact), cfg.pooling).has_classifier and not cfg.pooling \
            else "embed"
    # ORT keeps its default spinning thread pool: measured here, turning it off (so idle threads sleep)
    # cost ~2 ms at concurrency 1 and lowered throughput under load (bench/serve_vs_infinity.py notes)
    return partial(create_app, task=task), lambda: open_model(cfg.artifact, threads=cfg.threads, device=cfg.device,
                                                              max_batch=cfg.max_batch,
                                                              max_batch_tokens=cfg.max_batch_tokens,
                                                              pooling=cfg.pooling)


def _gen_loader(cfg: ServeConfig, model: str):
    from millis.gen import EngineConfig, open_engine
    from millis.serve.generation.app import create_gen_app

    engine = EngineConfig(max_batch=cfg.max_batch, max_seq=cfg.max_seq, dtype=cfg.dtype, quant=cfg.quant,
                          threads=cfg.threads, device=cfg.device, kv_memory_mb=cfg.kv_memory_mb,
                          prefix_cache=cfg.prefix_cache, speculate=cfg.speculate, draft_model=cfg.draft_model,
                          prefill_tokens_per_step=cfg.prefill_tokens_per_step)  # fails before binding
    # requests without a seed draw from a stream seeded anew per process: a restart, or another replica, does
    # not repeat the last one's answers (a fixed 0 did)
    return create_gen_app, lambda: open_engine(model, engine, seed=secrets.randbits(62))


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), address reuse on; a port in use is one clear line."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MillisError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(cfg: ServeConfig, loader=None) -> int:
    """Serve `cfg.artifact` over HTTP; returns the exit status (0 after a graceful drain)."""
    from millis.serve.encoder.app import create_app

    factory, loader = (create_app, loader) if loader is not None else app_and_loader(cfg)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    sock = bound_socket(cfg.host, cfg.port)
    sock.listen(2048)  # from here on connections wait in the backlog, none is refused while uvicorn starts
    host, port = sock.getsockname()[:2]
    app = factory(cfg, loader)
    # the connection's own bounds (guard.py): the head's size and time, the open connections within the fd limit
    protocol = guarded_protocol(max(16, raise_fd_limit() - FD_RESERVE), head_timeout_s=cfg.head_timeout_s)
    config = uvicorn.Config(app, loop="uvloop", http=protocol, lifespan="on", access_log=False,
                            log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_timeout_s,
                            timeout_keep_alive=30, backlog=2048)
    server = _Server(config, cfg.shutdown_timeout_s + HARD_EXIT_GRACE_S)
    print(f"millis serve: listening on http://{host}:{port} (model loads in the background; GET /ready)",
          flush=True)
    server.run(sockets=[sock])
    code = 0 if server.started else 1
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # a worker still busy (a runtime call, a tokenizer): its request is answered or gone; don't wait
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


EXPIRE_BEFORE_S = 1.0  # this long before the drain limit, requests not started are answered 503
HARD_EXIT_GRACE_S = 5.0  # after the drain limit, this long for the app's own shutdown before the process ends


class _Server(uvicorn.Server):
    """SIGTERM/SIGINT mean 'drain and exit 0'. (uvicorn's own handler re-raises the signal after
    shutdown, so the process would die with status 143 even after a clean drain.) The exit is
    bounded: uvicorn stops waiting for connections after the drain limit, and a watchdog ends the
    process (status 1) if anything still holds it `hard_exit_s` after the signal."""

    def __init__(self, config: uvicorn.Config, hard_exit_s: float) -> None:
        super().__init__(config)
        self.hard_exit_s = hard_exit_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        if not self.should_exit:
            threading.Thread(target=self._watchdog, name="millis-exit-watchdog", daemon=True).start()
            self._expire_before_the_limit()
        self.should_exit = True
        print(f"millis serve: {signal.Signals(sig).name}: draining admitted requests", file=sys.stderr, flush=True)

    def _expire_before_the_limit(self) -> None:
        """Shortly before the drain's limit, the app ends what is left (`expire_waiting`): encoder requests not started
        and generation answers get a 503 (a stream under way an error event): past the limit uvicorn would cancel
        them, a plain-text 500 each or a cut stream."""
        st = getattr(getattr(self.config.app, "state", None), "millis", None)
        expire = getattr(st, "expire_waiting", None)
        try:
            loop = asyncio.get_running_loop()  # a signal handler runs on the loop's thread
        except RuntimeError:
            return
        if expire is None:
            return
        limit = self.config.timeout_graceful_shutdown or 0.0
        delay = max(0.0, limit - min(EXPIRE_BEFORE_S, limit / 4))
        loop.call_soon_threadsafe(loop.call_later, delay, expire)  # signal-safe: the loop's self-pipe

    def _watchdog(self) -> None:
        time.sleep(self.hard_exit_s)
        print(f"millis serve: still not down {self.hard_exit_s:.0f} s after the signal; exiting now",
              file=sys.stderr, flush=True)
        os._exit(1)

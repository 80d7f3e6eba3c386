"""`GET /stats` (the last minutes of the server as JSON, from `Metrics.live`) and `GET /dashboard` (one
self-contained HTML page, dashboard.html beside this file, that polls /stats every second).

Like /metrics, both routes are outside `http.endpoint`: they are neither counted nor timed, so a page
left open does not pull the p99 it shows.
"""
from __future__ import annotations

import re
import time
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from millis.serve import schemas
from millis.serve.http import error_response, json_response, model_status
from millis.serve.live import SECONDS

DEFAULT_WINDOW_S = 60


@lru_cache(maxsize=1)
def page() -> bytes:
    return resources.files("millis.serve").joinpath("dashboard.html").read_bytes()


SNAPSHOT_S = 0.25  # /stats answers within this long of each other share one snapshot


def parse_window(values: list[str]) -> int:
    """?window= (every value given) as seconds in 1..SECONDS (absent: DEFAULT_WINDOW_S); anything else,
    twice given too, is a 400 naming it."""
    if not values:
        return DEFAULT_WINDOW_S
    raw = values[0] if len(values) == 1 else "&".join(values)
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= SECONDS:
        raise schemas.ApiError(400, f"window must be an integer number of seconds in 1..{SECONDS}, got {raw[:40]!r}",
                               param="window", code="invalid_value")
    return int(raw)


def live_routes(st, facts: Callable[[], dict[str, Any]], gauges: Callable[[], dict[str, Any]],
                loaded: Callable[[], bool]) -> list[Route]:
    """/stats and /dashboard over a state `st` (its `metrics.live`, name, cold start, draining, load
    error); `facts()` the loaded model's facts (name, task, variant, runtime, max length, slots),
    `gauges()` the values now (queue depth, running, KV blocks, ...)."""
    started = time.time()
    # window -> (when, snapshot): a snapshot of 600 s costs ~7 ms of the event loop (percentiles, a 65 KB body);
    # four pages polling it took a bystander's p50 from 10 to 108 ms. Calls within SNAPSHOT_S share one.
    shared: dict[int, tuple[float, dict]] = {}

    async def stats(request: Request) -> Response:
        try:
            window = parse_window(request.query_params.getlist("window"))
        except schemas.ApiError as e:
            return error_response(e)
        now = time.monotonic()
        for w in [w for w, (t, _) in shared.items() if now - t > SNAPSHOT_S]:
            del shared[w]
        if window not in shared:
            shared[window] = (now, st.metrics.live.snapshot(window))
        body = dict(shared[window][1])
        ok = loaded()
        body["model"] = {"name": st.name, "status": model_status(st, ok), "cold_start_s": round(st.cold_start_s, 3),
                         "uptime_s": round(time.time() - started, 1), **(facts() if ok else {})}
        body["gauges"] = {"inflight": st.metrics.live.inflight, **(gauges() if ok else {})}
        return json_response(body, headers={"Cache-Control": "no-store"})

    async def dashboard(request: Request) -> Response:
        return Response(page(), 200, {"Cache-Control": "no-cache"}, "text/html; charset=utf-8")

    return [Route("/stats", stats, methods=["GET"]), Route("/dashboard", dashboard, methods=["GET"])]


def encoder_live_routes(st) -> list[Route]:
    """Over the encoder app's `State`."""
    def facts() -> dict[str, Any]:
        m, cfg = st.model, st.cfg
        return {"task": m.task, "variant": m.variant, "runtime": m.meta.variant.runtime, "max_length": m.max_length,
                "dimensions": st.dim, "max_batch": cfg.max_batch, "max_batch_tokens": cfg.max_batch_tokens,
                "max_queue": cfg.max_queue}

    return live_routes(st, facts, lambda: {"queue_depth": st.batcher.depth}, lambda: st.model is not None)


def generation_live_routes(st) -> list[Route]:
    """Over the generation app's `GenState`: slots, waiting requests and the paged KV cache (native
    models; None otherwise) of its engine."""
    def facts() -> dict[str, Any]:
        eng, cfg, kv = st.engine, st.cfg, st.engine.kv
        return {"task": "generate", "variant": f"{cfg.dtype}/{cfg.quant}", "runtime": "millis.gen",
                "max_length": eng.max_seq, "slots": eng.max_batch, "max_queue": cfg.max_queue,
                "kv_blocks": kv.n_blocks if kv is not None else None,
                "kv_block_size": kv.block_size if kv is not None else None}

    def gauges() -> dict[str, Any]:
        eng, kv = st.engine, st.engine.kv
        waiting = len(eng.waiting)
        g = {"running": eng.max_batch - eng.free_slots, "waiting": waiting, "queue_depth": waiting,
             "slots": eng.max_batch}
        if kv is not None:  # blocks in use / total now; the prefix cache's hit rate since start
            used = kv.in_use
            g.update(kv_blocks_used=used, kv_blocks_total=kv.n_blocks, kv_used=round(used / kv.n_blocks, 4),
                     prefix_hit_rate=round(kv.hit_rate, 4))
        return g

    return live_routes(st, facts, gauges, lambda: st.engine is not None)

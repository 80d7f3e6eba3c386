"""The HTTP app: Starlette routes over one `Batcher` that owns the queue.

The model loads in a thread after the server starts, so `/health` answers at once and `/ready`
turns 200 when every length bucket has run once (cold start = load + warm-up, a metric).
A request: parse and validate (4xx on any bad input) -> tokenize (on the loop for small inputs,
in a thread for large ones) -> submit its rows (429 if the queue is full) -> await the rows,
watching for the client leaving and for the request timeout -> JSON with timing headers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter
from typing import Any, Awaitable, Callable

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from millis.api import Model
from millis.serve import schemas
from millis.serve.batcher import Batcher, ClientGone, Job, Overloaded, ShuttingDown, bucket_of
from millis.serve.config import ServeConfig
from millis.serve.metrics import Metrics

log = logging.getLogger("millis.serve")
INLINE_TOKENIZE_CHARS = 2048  # above this a request is tokenized in a thread, not on the event loop


class RequestTimeout(ClientGone):
    pass


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, "application/json")


class State:
    """What the routes share: config, metrics, and (once loaded) the model and its batcher."""

    def __init__(self, cfg: ServeConfig, loader: Callable[[], Model]):
        self.cfg, self.loader, self.metrics = cfg, loader, Metrics()
        self.limits = schemas.Limits(cfg.max_inputs, cfg.max_body_bytes)
        self.model: Model | None = None
        self.batcher: Batcher | None = None
        self.name = cfg.model_name or Path(cfg.artifact).name or "model"
        self.dim = 0
        self.cold_start_s = 0.0
        self.load_error: str | None = None
        self.draining = False
        self.started_at = int(time.time())
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="millis-tokenize")

    # ---- start-up -------------------------------------------------------------------------
    async def load(self) -> None:
        t0 = perf_counter()
        try:
            model = await asyncio.to_thread(self.loader)
            batcher = Batcher(lambda rows, t: self._infer(model, rows, t), model.max_length, self.cfg.max_batch,
                              self.cfg.max_batch_tokens, self.cfg.max_wait_ms / 1000, self.cfg.max_queue,
                              self.metrics.on_batch)
            self.dim = await asyncio.to_thread(self._warm, model)
        except Exception as e:  # noqa: BLE001 -- reported on /ready and in the log; /health stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("millis serve: model failed to load: %s", self.load_error)
            return
        self.cold_start_s = perf_counter() - t0
        self.model, self.batcher = model, batcher
        batcher.start()
        m = self.metrics
        m.cold_start.set(self.cold_start_s)
        m.info.labels(self.name, model.variant, model.meta["variant"]["runtime"], model.task).set(1)
        m.ready.set(1)
        log.warning("millis serve: %s (%s, %s) ready in %.2f s", self.name, model.variant, model.task,
                    self.cold_start_s)

    @staticmethod
    def _infer(model: Model, rows: list[list[int]], t: int):
        # worker thread: (B rows, bucket T) -> (B, D) float32
        return model.runtime.run(model.encoder.pack(rows, t))[model.runtime.output_name]

    def _warm(self, model: Model) -> int:
        """Run every length bucket once (batch 1), and a full batch at the shortest: returns D."""
        model.encoder.token_ids(["warm up"])  # settles the tokenizer's settings before threads share it
        lengths = sorted({bucket_of(n, model.max_length) for n in range(1, model.max_length + 1)})
        if not self.cfg.warmup:
            lengths = lengths[:1]
        dim = 0
        for t in lengths:
            dim = self._infer(model, [[model.encoder.pad_id] * t], t).shape[-1]
        rows = max(1, min(self.cfg.max_batch, self.cfg.max_batch_tokens // lengths[0]))
        self._infer(model, [[model.encoder.pad_id] * lengths[0]] * rows, lengths[0])
        return int(dim)

    async def close(self) -> None:
        self.draining = True
        if self.batcher is not None:
            await self.batcher.close()
        self._tok_pool.shutdown(wait=False)

    # ---- one request ----------------------------------------------------------------------
    def require(self, task: str) -> Model:
        if self.model is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
            raise schemas.ApiError(503, msg, code="not_ready", headers={"Retry-After": "1"})
        if self.model.task != task:
            other = "/v1/classify" if self.model.task == "classify" else "/v1/embeddings"
            raise schemas.ApiError(400, f"this server hosts a model for the {self.model.task!r} task; use {other}",
                                   code="wrong_task")
        return self.model

    async def tokenize(self, model: Model, texts: list[str]) -> tuple[list[list[int]], list[bool], float]:
        t0 = perf_counter()
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            ids, cut = model.encoder.token_ids(texts)
        else:
            ids, cut = await asyncio.get_running_loop().run_in_executor(self._tok_pool, model.encoder.token_ids, texts)
        if self.cfg.too_long == "reject" and any(cut):
            i = cut.index(True)
            raise schemas.ApiError(413, f"input[{i}] is longer than the model's {model.max_length} tokens "
                                        f"(the server rejects long texts; send shorter ones)", code="text_too_long")
        return ids, cut, perf_counter() - t0

    async def run(self, rows: list[list[int]], request: Request) -> Job:
        """Submit rows and wait for them; the client leaving or the timeout drops the job."""
        loop = asyncio.get_running_loop()
        job = Job(rows, loop.create_future())
        try:
            self.batcher.submit(job)
        except Overloaded as e:
            raise schemas.ApiError(429, str(e), code="overloaded", headers={"Retry-After": str(e.retry_after_s)})
        except ShuttingDown as e:
            raise schemas.ApiError(503, str(e), code="shutting_down", headers={"Retry-After": "1"})
        self.metrics.queue_depth.set(self.batcher.depth)
        timer = loop.call_later(self.cfg.request_timeout_s, job.drop,
                                RequestTimeout(f"not answered within {self.cfg.request_timeout_s} s"))
        watcher = loop.create_task(_watch_disconnect(request, job))
        try:
            await job.future
        except RequestTimeout as e:
            raise schemas.ApiError(503, str(e), code="timeout", headers={"Retry-After": "1"})
        finally:
            timer.cancel()
            if not watcher.done():
                watcher.cancel()
            self.metrics.queue_depth.set(self.batcher.depth)
        return job


async def _watch_disconnect(request: Request, job: Job) -> None:
    """After the body is read, the next ASGI message is http.disconnect (client left or reply sent)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.drop(ClientGone("client disconnected"))


def timing_headers(job: Job, tokenize_s: float, cut: list[bool]) -> dict[str, str]:
    q, i = max(job.queue_s, 0.0) * 1e3, job.infer_s * 1e3
    h = {"x-millis-queue-ms": f"{q:.3f}", "x-millis-tokenize-ms": f"{tokenize_s * 1e3:.3f}",
         "x-millis-inference-ms": f"{i:.3f}", "x-millis-batch-rows": str(job.batch_rows),
         "server-timing": f"queue;dur={q:.3f}, tokenize;dur={tokenize_s * 1e3:.3f}, inference;dur={i:.3f}"}
    if any(cut):
        h["x-millis-truncated"] = ",".join(str(k) for k, c in enumerate(cut) if c)
    return h


def endpoint(st: State, route: str, fn: Callable[[Request], Awaitable[Response]]):
    """Errors -> JSON error bodies with their status; every answer counted and timed."""
    async def handler(request: Request) -> Response:
        t0 = perf_counter()
        st.metrics.inflight.inc()
        try:
            resp = await fn(request)
        except schemas.ApiError as e:
            resp = Response(e.body(), e.status, e.headers, "application/json")
        except ClientGone:
            resp = Response(b"", 499)  # nobody reads it
        except Exception as e:  # noqa: BLE001 -- a bug or runtime failure: 500 with the reason, server lives
            log.exception("millis serve: %s failed", route)
            resp = Response(schemas.ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), 500,
                            None, "application/json")
        finally:
            st.metrics.inflight.dec()
        st.metrics.requests.labels(route, str(resp.status_code)).inc()
        st.metrics.duration.labels(route).observe(perf_counter() - t0)
        return resp
    return handler


def create_app(cfg: ServeConfig, loader: Callable[[], Model]) -> Starlette:
    st = State(cfg, loader)
    m = st.metrics

    async def _infer(request: Request, task: str):
        model = st.require(task)
        body = schemas.parse_json(await request.body(), st.limits)
        return model, body

    async def _answer(request, model, texts):
        ids, cut, tok_s = await st.tokenize(model, texts)
        job = await st.run(ids, request)
        m.tokenize.observe(tok_s)
        m.queue.observe(max(job.queue_s, 0.0))
        m.inference.observe(job.infer_s)
        return job, cut, tok_s, sum(map(len, ids))

    async def embeddings(request: Request) -> Response:
        model, body = await _infer(request, "embed")
        texts, fmt = schemas.embeddings_request(body, st.name, st.dim, st.limits)
        job, cut, tok_s, n_tok = await _answer(request, model, texts)
        return json_response(schemas.embeddings_response(job.out, fmt, st.name, n_tok),
                             headers=timing_headers(job, tok_s, cut))

    async def classify(request: Request) -> Response:
        model, body = await _infer(request, "classify")
        texts, top_k, logits = schemas.classify_request(body, st.name, st.dim, st.limits)
        job, cut, tok_s, n_tok = await _answer(request, model, texts)
        return json_response(schemas.classify_response(job.out, model.id2label, top_k, logits, cut, st.name, n_tok),
                             headers=timing_headers(job, tok_s, cut))

    async def models(request: Request) -> Response:
        card: dict[str, Any] = {"id": st.name, "object": "model", "created": st.started_at, "owned_by": "millis"}
        if st.model is not None:
            card.update(task=st.model.task, variant=st.model.variant, max_length=st.model.max_length,
                        dimensions=st.dim)
        return json_response({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(request: Request) -> Response:
        return ready_response(st, st.model is not None)

    async def metrics(request: Request) -> Response:
        if st.batcher is not None:
            m.queue_depth.set(st.batcher.depth)
        data, ctype = m.render()
        return Response(data, 200, media_type=ctype)

    async def openapi(request: Request) -> Response:
        return json_response(schemas.OPENAPI)

    routes = [Route("/v1/embeddings", endpoint(st, "/v1/embeddings", embeddings), methods=["POST"]),
              Route("/v1/classify", endpoint(st, "/v1/classify", classify), methods=["POST"]),
              Route("/v1/models", endpoint(st, "/v1/models", models), methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"])]
    return make_app(st, routes)


def ready_response(st, loaded: bool) -> Response:
    """/ready: 200 once the model is loaded and warmed, 503 while loading, failed or draining."""
    if loaded and not st.draining:
        return json_response({"status": "ready", "model": st.name, "cold_start_s": round(st.cold_start_s, 3)})
    status = "draining" if st.draining else ("failed: " + st.load_error if st.load_error else "loading")
    return json_response({"status": status}, 503)


def make_app(st, routes: list[Route]) -> Starlette:
    """The Starlette app around a state `st` (with `load`, `close`, `draining`): the model loads in the
    background after start-up, so /health answers at once; on shutdown admitted work finishes."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        loading = asyncio.create_task(st.load())
        yield
        st.draining = True
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await st.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.millis = st
    return app

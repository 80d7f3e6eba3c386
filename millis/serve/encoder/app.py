"""The encoder server's HTTP app: Starlette routes over one `Batcher` that owns the queue.

The model loads in a thread after the server starts, so `/health` answers at once and `/ready`
turns 200 when every length bucket has run once (cold start = load + warm-up, a metric).
A request: parse and validate (4xx on any bad input) -> tokenize (on the loop for small inputs,
in a thread for large ones) -> submit its rows (429 if the queue is full) -> await the rows -> JSON
with timing headers. From its arrival to its answer it watches for its client leaving and for the
request timeout (`Watch`): the wait for the tokenizer's thread counts, not only the queue's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from millis.artifact.model import Model
from millis.runtimes.base import gives_token_states, shares_scales_across_rows
from millis.serve import openapi, schemas
from millis.encoder.text import bucket_length
from millis.serve.encoder.batcher import Batcher, Job, Overloaded, RuntimeThread, ShuttingDown, timing_headers
from millis.serve.encoder import tei, tei_tokens
from millis.serve.encoder.tei_routes import tei_routes
from millis.serve.encoder.rerank import COHERE, Shape, distinct, pair_key, relevance, rerank_request, rerank_response
from millis.serve.config import WARM_MAX_TOKENS, ServeConfig
from millis.serve.dashboard import encoder_live_routes
from millis.serve.http import (INLINE_TOKENIZE_CHARS, ClientGone, endpoint, health_response, json_response,
                               make_app, model_routes, off_loop, read_json, ready_response, watch_disconnect)
from millis.serve.metrics import Metrics

log = logging.getLogger("millis.serve")


class RequestTimeout(ClientGone):
    pass


WATCH_AFTER_S = 0.02  # how long a request waits (tokenizer, queue) before it watches for its client leaving


class Watch:
    """What ends a request before its answer: its deadline, request_timeout_s after it arrived, and its
    client leaving, watched once it has waited WATCH_AFTER_S (a request answered sooner never pays for the
    watcher task, ~10 us). Either drops its job once submitted (its rows are then skipped, not run)."""

    def __init__(self, request: Request, arrived: float, timeout_s: float):
        """arrived: the event loop's time when the request came in."""
        loop = asyncio.get_running_loop()
        self.job: Job | None = None
        self.why: ClientGone | None = None  # why the request ended, once it has
        self.ended: asyncio.Future | None = None  # the same as a future, made only for `until` (large inputs)
        self.timer = loop.call_at(arrived + timeout_s, self.drop, RequestTimeout(f"not answered within {timeout_s} s"))
        self.watcher: asyncio.Task | None = None
        self.starter = loop.call_later(WATCH_AFTER_S, self.start_watching, request)

    def start_watching(self, request: Request) -> None:
        self.watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, self))

    def drop(self, exc: ClientGone) -> None:
        if self.why is None:
            self.why = exc
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(exc)
        if self.job is not None:
            self.job.drop(exc)

    def check(self) -> None:
        """Raise why the request ended, if it has."""
        if self.why is not None:
            raise self.why

    async def until(self, work: Any) -> Any:
        """The awaitable's result, unless the request ends first: it is then cancelled (an off_loop call still
        waiting for a thread never starts one) and why it ended is raised."""
        task = asyncio.ensure_future(work)
        if self.ended is None:
            self.ended = asyncio.get_running_loop().create_future()
            if self.why is not None:
                self.ended.set_result(self.why)
        await asyncio.wait((task, self.ended), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            self.check()
        return task.result()

    def close(self) -> None:
        self.timer.cancel()
        self.starter.cancel()
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


class State:
    """What the routes share: config, metrics, and (once loaded) the model and its batcher."""

    def __init__(self, cfg: ServeConfig, loader: Callable[[], Model]):
        self.cfg, self.loader, self.metrics = cfg, loader, Metrics()
        self.limits = schemas.Limits(cfg.max_inputs, cfg.max_body_bytes, cfg.request_timeout_s)
        self.model: Model | None = None
        self.batcher: Batcher | None = None
        self.name = cfg.model_name or Path(cfg.artifact).name or "model"
        self.dim = 0
        self.cold_start_s = 0.0
        self.load_error: str | None = None
        self.draining = False
        self.started_at = int(time.time())

    # ---- start-up -------------------------------------------------------------------------
    async def load(self) -> None:
        t0 = perf_counter()
        pool = RuntimeThread()
        try:
            model = await pool.call(self.loader)  # the thread that will run it (RuntimeThread)
            batcher = Batcher(lambda rows, t: self._infer(model, rows, t), model.max_length, self.cfg.max_batch,
                              self.cfg.max_batch_tokens, self.cfg.max_wait_ms / 1000, self.cfg.max_queue,
                              self.metrics.on_batch, pool, shares_scales_across_rows(model.runtime),
                              (lambda rows, t: self._states(model, rows, t)) if gives_token_states(model.runtime)
                              else None)
            self.dim = await pool.call(self._warm, model)
        except Exception as e:  # noqa: BLE001 -- reported on /ready and in the log; /health stays up
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("millis serve: model failed to load: %s", self.load_error)
            pool.shutdown(wait=False)
            return
        except asyncio.CancelledError:  # shut down while loading: no batcher starts; the thread ends after its call
            pool.shutdown(wait=False)
            raise
        self.cold_start_s = perf_counter() - t0
        self.model, self.batcher = model, batcher
        batcher.start()
        m = self.metrics
        m.cold_start.set(self.cold_start_s)
        m.info.labels(self.name, model.variant, model.meta.variant.runtime, model.task).set(1)
        m.ready.set(1)
        log.warning("millis serve: %s (%s, %s) ready in %.2f s", self.name, model.variant, model.task,
                    self.cold_start_s)

    @staticmethod
    def _infer(model: Model, rows: list[list[int]], t: int):
        # worker thread: (B rows, bucket T) -> (B, D) float32
        return model.runtime.run(model.encoder.pack(rows, t))[model.runtime.output_name]

    @staticmethod
    def _states(model: Model, rows: list[list[int]], t: int):  # worker thread: -> (B, T, D) float32 (/embed_all)
        return model.runtime.token_states(model.encoder.pack(rows, t))

    def gives_token_states(self) -> bool:
        return self.batcher is not None and self.batcher.infer_tokens is not None

    def _warm(self, model: Model) -> int:
        """Each length bucket up to WARM_MAX_TOKENS once (batch 1), and a full batch at the shortest: returns D."""
        model.encoder.token_ids(["warm up"])  # settles the tokenizer's settings before threads share it
        top = min(model.max_length, WARM_MAX_TOKENS)
        lengths = sorted({bucket_length(n, model.max_length) for n in range(1, top + 1)})
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

    def expire_waiting(self) -> None:
        """Near the drain's limit: requests still queued get a 503 now (their rows never run)."""
        self.draining = True
        if self.batcher is not None:
            self.batcher.expire(ShuttingDown("server is shutting down: the drain limit passed before this request "
                                             "started"))

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

    async def token_ids(self, model: Model, texts: list[str] | schemas.TokenInput, watch: Watch,
                        query: str | None = None):
        """(ids, cut) of the texts, or of (query, text) pairs when a query is given, or of ids given as they are;
        off the loop when large, and only while the request lasts (`watch`)."""
        enc = model.encoder
        if isinstance(texts, schemas.TokenInput):
            fn, args, size = schemas.given_ids, (texts, model.vocab_size, model.max_length), texts.size
        elif query is not None:
            fn, args, size = enc.pair_ids, (query, texts), sum(map(len, texts)) + len(query) * len(texts)
        else:
            fn, args, size = enc.token_ids, (texts,), sum(map(len, texts))
        return await sized(size, watch, fn, *args)

    async def tokenize(self, model: Model, texts: list[str] | schemas.TokenInput, watch: Watch,
                       query: str | None = None, field: str = "input",
                       reject: bool | None = None,
                       places: list[int | str] | None = None) -> tuple[list[list[int]], list[bool], float]:
        """(ids, cut, seconds); `field`: the request's name for the texts, which a 413 names (with a query: the query
        where it alone is too long, else the document; /predict's `inputs`: a pair's first text); reject: the
        request's `truncate` false (True) or true (False: cut, as TEI's explicit truncate), None the server's rule;
        places: each text's index in the request (default: its own)."""
        t0 = perf_counter()
        ids, cut = await self.token_ids(model, texts, watch, query)
        if (self.cfg.too_long == "reject" if reject is None else reject) and any(cut):
            i = cut.index(True)
            alone = query is not None and (await self.token_ids(model, [query], watch))[1][0]  # the query over it
            raise schemas.too_long(field, places[i] if places else i, query is not None, alone, model.max_length,
                                   reject is None)
        return ids, cut, perf_counter() - t0

    async def run(self, rows: list[list[int]], watch: Watch, tokens: bool = False) -> Job:
        """Submit rows and wait for them; the client leaving or the timeout (`watch`) drops the job. tokens: every
        token's state (/embed_all), at most --max-batch-tokens of them a request (its answer's size)."""
        loop = asyncio.get_running_loop()
        watch.check()  # it ended while tokenizing: nothing is queued
        if tokens and (n := sum(map(len, rows))) > self.cfg.max_batch_tokens:
            raise schemas.ApiError(413, f"inputs hold {n} tokens: /embed_all answers at most "
                                        f"{self.cfg.max_batch_tokens} token vectors a request (--max-batch-tokens)",
                                   param="inputs", code="too_many_tokens")
        job = Job(rows, loop.create_future(), tokens=tokens)
        try:
            self.batcher.submit(job)
        except Overloaded as e:
            raise schemas.ApiError(429, str(e), code="overloaded", headers={"Retry-After": str(e.retry_after_s)})
        except ShuttingDown as e:
            raise schemas.ApiError(503, str(e), code="shutting_down", headers={"Retry-After": "1"})
        watch.job = job
        self.metrics.on_queue_depth(self.batcher.depth)
        try:
            await job.future
        except ShuttingDown as e:  # expired at the drain's limit (expire_waiting)
            raise schemas.ApiError(503, str(e), code="shutting_down", headers={"Retry-After": "1"}) from None
        except asyncio.CancelledError:  # the server cancelled the request (past the drain): its rows never run
            job.drop(ClientGone("request cancelled"))
            raise
        finally:
            self.metrics.on_queue_depth(self.batcher.depth)
        return job


@contextlib.contextmanager
def watched(st: State, request: Request, arrived: float):
    """A `Watch` over the request's work; its timeout answered 503."""
    watch = Watch(request, arrived, st.cfg.request_timeout_s)
    try:
        yield watch
    except RequestTimeout as e:
        raise schemas.ApiError(503, str(e), code="timeout", headers={"Retry-After": "1"}) from None
    finally:
        watch.close()


async def sized(size: int, watch: Watch, fn: Callable, *args):
    """fn(*args): on the loop when size (characters, ids) is small, else in a thread while the request lasts."""
    return fn(*args) if size <= INLINE_TOKENIZE_CHARS else await watch.until(off_loop(fn, *args))


def offload(st: State, request: Request, arrived: float) -> Callable:
    """off(size, fn, *args) -> fn(*args) as `sized` runs it, watched as the other routes' work (tei_tokens' /tokenize
    and /decode)."""
    async def off(size: int, fn: Callable, *args):
        with watched(st, request, arrived) as watch:
            return await sized(size, watch, fn, *args)
    return off


def create_app(cfg: ServeConfig, loader: Callable[[], Model], task: str = "") -> Starlette:
    """The encoder app; with `task` (embed / classify, known before loading) only that task's route
    exists and is published, else both (the wrong one answers 400 wrong_task)."""
    st = State(cfg, loader)
    m = st.metrics

    async def _infer(request: Request, task: str):
        arrived = asyncio.get_running_loop().time()  # the request's deadline counts from here
        model = st.require(task)
        body = await read_json(request, st.limits)
        return model, body, arrived

    async def _answer(request, arrived, model, texts, query=None, field="input", reject=None, places=None, groups=(),
                      tokens=False):
        """groups: [(query, texts, places)] tokenized apart, run as one job (TEI's /predict: pairs of many firsts);
        tokens: each token's state, not the pooled row (/embed_all)"""
        with watched(st, request, arrived) as watch:
            ids, cut, tok_s = [], [], 0.0
            for q, t, p in groups or [(query, texts, places)]:
                i, c, s = await st.tokenize(model, t, watch, q, field, reject, p)
                ids += i
                cut += c
                tok_s += s
            job = await st.run(ids, watch, tokens)
        m.on_stages(max(job.queue_s, 0.0), tok_s, job.infer_s)
        return job, cut, tok_s, sum(map(len, ids))

    async def embeddings(request: Request) -> Response:
        model, body, arrived = await _infer(request, "embed")
        texts, fmt, dims, reject = schemas.embeddings_request(body, st.name, st.dim, st.limits,
                                                                tei.sparse_model(model))
        job, cut, tok_s, n_tok = await _answer(request, arrived, model, texts, reject=reject)
        out = schemas.shortened(job.out, dims, model.meta.source.pooling.normalize)
        return json_response(schemas.embeddings_response(out, fmt, st.name, n_tok),
                             headers=timing_headers(job, tok_s, cut))

    async def classify(request: Request) -> Response:
        model, body, arrived = await _infer(request, "classify")
        texts, top_k, logits, reject = schemas.classify_request(body, st.name, st.dim, st.limits)
        field = "inputs" if "inputs" in body else "input"
        job, cut, tok_s, n_tok = await _answer(request, arrived, model, texts, field=field, reject=reject)
        return json_response(schemas.classify_response(job.out, model.id2label, top_k, logits, cut, st.name, n_tok,
                                                           model.problem_type),
                             headers=timing_headers(job, tok_s, cut))

    async def _rerank(request: Request, shape: Shape):
        """A cross-encoder: (query, document) pairs, one row each; documents whose pairs tokenize the same (the
        same text, or texts an uncased tokenizer reads alike) run once and share their score."""
        model, body, arrived = await _infer(request, "classify")
        req = rerank_request(body, st.name, st.limits, shape, model.max_length, len(model.id2label), model.problem_type)
        once, where, firsts = distinct(req.documents)  # each text tokenized once
        with watched(st, request, arrived) as watch:
            ids, cut, tok_s = await st.tokenize(model, once, watch, req.query, shape.documents, req.reject, firsts)
            _, row_of, row_first = distinct([pair_key(r) for r in ids])  # each distinct row run once
            job = await st.run([ids[k] for k in row_first], watch)
        m.on_stages(max(job.queue_s, 0.0), tok_s, job.infer_s)
        scores = relevance(job.out, req.raw_scores)[[row_of[k] for k in where]]
        return req, scores, [cut[k] for k in where], job, tok_s, sum(map(len, ids))

    async def rerank(request: Request) -> Response:
        req, scores, cut, job, tok_s, n_tok = await _rerank(request, COHERE)
        return json_response(rerank_response(scores, req.sent, req.top_n, req.return_documents, cut, st.name,
                                             n_tok), headers=timing_headers(job, tok_s, cut))

    async def tokenize(request: Request) -> Response:  # the ids inference runs, whatever the task
        arrived = asyncio.get_running_loop().time()
        model = st.require(st.model.task if st.model is not None else "")
        body = await read_json(request, st.limits)
        schemas.check_model(body, st.name)
        if "inputs" in body and "input" not in body:  # TEI's shape, its answer and errors (tei_tokens)
            return await tei_tokens.tokenize(model, body, st.limits, offload(st, request, arrived))
        if "add_special_tokens" in body:  # the ids inference runs hold them; TEI's shape may leave them out
            raise schemas.ApiError(400, "add_special_tokens is a field of TEI's /tokenize: send `inputs` for it",
                                   param="add_special_tokens", code="invalid_value")
        texts = schemas.input_texts(body, st.limits, "input")[0]
        with watched(st, request, arrived) as watch:
            ids, cut = await st.token_ids(model, texts, watch)
        return json_response({"object": "list", "model": st.name, "max_length": model.max_length, "data": [
            {"index": i, "tokens": list(map(int, t)), "count": len(t), "truncated": bool(c)}
            for i, (t, c) in enumerate(zip(ids, cut))]})

    def card() -> dict[str, Any]:
        c: dict[str, Any] = {"id": st.name, "object": "model", "created": st.started_at, "owned_by": "millis"}
        if st.model is not None:
            c.update(task=st.model.task, variant=st.model.variant, max_length=st.model.max_length, dimensions=st.dim)
        return c

    async def health(request: Request) -> Response:
        return health_response(st)

    async def ready(request: Request) -> Response:
        return ready_response(st, st.model is not None)

    async def metrics(request: Request) -> Response:
        if st.batcher is not None:
            m.queue_depth.set(st.batcher.depth)
        data, ctype = m.render()
        return Response(data, 200, media_type=ctype)

    def post(path: str, fn, invalid: int = 400) -> Route:
        return Route(path, endpoint(st, path, fn, invalid), methods=["POST"])

    # a sequence classifier over (query, document) pairs is a cross-encoder: classify models rerank too (Cohere's
    # v2 client posts to /v2/rerank, its v1 to /v1/rerank)
    teis = tei_routes(st, _infer, _answer, _rerank, post, timing_headers, offload)
    by_task = {"embed": [post("/v1/embeddings", embeddings), *teis["embed"]],
               "classify": [post("/v1/classify", classify), post("/v1/rerank", rerank), post("/v2/rerank", rerank),
                            *teis["classify"]]}
    routes = [r for t, rs in by_task.items() if task in ("", t) for r in rs] + teis[""] + [
              *model_routes(st, card),
              post("/tokenize", tokenize),
              Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              *encoder_live_routes(st)]
    return make_app(st, routes, lambda: openapi.encoder_spec(
        task or (st.model.task if st.model else ""), st.name, cfg.max_inputs, st.dim, st.dim,
        st.model.vocab_size if st.model else 0, bool(st.model and st.model.meta.source.pooling.normalize),
        st.model.max_length if st.model else 0, st.model.problem_type if st.model else "",
        st.model is None or st.gives_token_states(), st.model is None or tei.sparse_model(st.model),
        tuple(st.model.encoder.prompts) if st.model else ()))

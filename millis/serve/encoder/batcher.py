"""The queue owner: one asyncio task forms batches and hands each to one worker thread.

Requests are split into rows (one text each). A row waits in the deque of its length bucket
(`millis.encoder.text.bucket_length`, the rule `run_texts` pads by), so a batch only pads rows of
similar length. When the worker is free the batcher takes the bucket whose head is oldest and
fills a batch from it up to `max_batch` rows and `max_tokens` (rows x bucket length, padding
counted). With `max_wait_s` > 0 it first waits, at most that long past the oldest row's arrival,
for the batch to fill; with 0 it never idles the runtime, and batches still form from the rows
that arrive while the previous batch runs. The runtime call runs in a worker thread, so the event
loop keeps accepting and answering while the model computes; the batcher resolves the futures on
the loop itself. Rows of a request whose client has gone (or timed out) are skipped, not run.
With `one_row_per_call` (a runtime whose rows share one activation scale: dynamic int8 per tensor,
`millis.runtimes.base.shares_scales_across_rows`) a call holds one row, so no text's result depends on its
batch-mates, of another request or of its own (a request's texts ran together: the same text moved by up to 0.006
with another text beside it).
A job asks for its rows' pooled outputs, or (`tokens`: TEI's /embed_all) every token's last hidden state; the two
kinds wait in queues of their own (a batch is of one kind), served oldest head first alike.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable

import numpy as np

from millis.encoder.text import bucket_length

# (rows of token ids, bucket length T) -> (len(rows), D) float32 (tokens: (len(rows), T, D)); runs in the worker thread
InferFn = Callable[[list[list[int]], int], np.ndarray]


class RuntimeThread:
    """The worker thread that loads, warms and runs the model. One thread for all three: torch's OpenMP
    keeps a thread team per calling thread, and once two threads' teams exist (say, the loader's and the
    runtime's) they outnumber 2 cores, so libgomp stops spinning between parallel regions and every small op
    waits for its workers to wake: torch eager MiniLM ran 1.7x slower in the server than in process on 2
    cores (docs/serving.md). The native, ONNX Runtime and OpenVINO runtimes have pools of their own.

    `await thread.call(fn, *args)`: fn(*args) in the thread, its result (or exception) back on the loop. One
    queue put and one call_soon_threadsafe a call, where run_in_executor also builds a concurrent Future (and
    its Condition) and chains it to an asyncio one. A daemon thread: a call still running never holds the
    process's exit (the server's watchdog bounds that)."""

    def __init__(self, name: str = "millis-runtime") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        if self._closed:
            raise RuntimeError("the runtime thread is shut down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        return fut

    def shutdown(self, wait: bool = True) -> None:
        """Run the calls already queued, then end the thread (wait: until it has)."""
        if not self._closed:
            self._closed = True
            self._calls.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, fut, fn, args = item
            try:
                ok, value = True, fn(*args)
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting coroutine
                ok, value = False, e
            try:
                loop.call_soon_threadsafe(settle, fut, ok, value)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del item, loop, fut, fn, args, value  # an idle thread holds no batch, result or traceback


def settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():  # a waiter that was cancelled is done already
        return
    if not ok and isinstance(value, StopIteration):  # a future refuses it (TypeError): the waiter would hang
        value = RuntimeError(f"runtime call raised {type(value).__name__}")
    (fut.set_result if ok else fut.set_exception)(value)


MAX_RETRY_AFTER_S = 30  # a longer Retry-After would idle the clients that obey it past any queue this server holds


class Overloaded(Exception):
    """The queue cannot take this request now: answer 429 and suggest when to retry."""

    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"server busy: {depth} rows queued; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The server is draining after SIGTERM: no new work is admitted."""


@dataclass(eq=False)
class Job:
    """One request: its rows, where their outputs go, and the times it spent."""

    rows: list[list[int]]                   # token ids per text, already truncated
    future: asyncio.Future                  # resolved (None) when every row is done
    t_submit: float = field(default_factory=perf_counter)
    out: list = field(init=False)           # per row: (D,) float32 once run
    pending: int = field(init=False)        # rows not yet run
    gone: bool = False                      # client left or timed out: skip rows not yet run
    queue_s: float = -1.0                   # submit -> its first row enters a runtime call
    infer_s: float = 0.0                    # wall time of the runtime calls its rows were in
    batch_rows: list[int] = field(default_factory=list)  # rows of each runtime call it rode in
    queued: int = 0                         # rows in the batcher's queues (not popped yet)
    on_drop: Callable[["Job"], None] | None = None  # the batcher's: its queued rows no longer count as waiting
    tokens: bool = False                    # every token's state (out[i]: (len(rows[i]), D)), not the pooled row

    def __post_init__(self) -> None:
        self.out = [None] * len(self.rows)
        self.pending = len(self.rows)

    def drop(self, exc: Exception) -> None:
        if not self.gone and self.on_drop is not None:
            self.on_drop(self)
        self.gone = True
        if not self.future.done():
            self.future.set_exception(exc)


class Batcher:
    def __init__(self, infer: InferFn, max_length: int, max_batch: int, max_tokens: int,
                 max_wait_s: float, max_queue: int, on_batch: Callable[[int, int, float], None] | None = None,
                 pool: RuntimeThread | None = None, one_row_per_call: bool = False,
                 infer_tokens: InferFn | None = None):
        """pool: the one worker thread runtime calls run in (`RuntimeThread`); the caller may have loaded the
        model in it already. one_row_per_call: one row a call (rows that share scales). infer_tokens: the rows'
        token states (None: a job asking for them is refused)."""
        self.infer, self.max_length, self.one_row_per_call = infer, max_length, one_row_per_call
        self.infer_tokens = infer_tokens
        self.max_batch, self.max_tokens, self.max_wait_s, self.max_queue = max_batch, max_tokens, max_wait_s, max_queue
        self.on_batch = on_batch                         # metrics hook: (rows, tokens, seconds)
        self.depth = 0                                   # rows queued, gone ones included until popped
        self.gone_rows = 0                               # of them, rows of requests gone (dropped): not waiting
        self._queues: dict[tuple[int, bool], deque[tuple[Job, int]]] = {}  # by (bucket length, tokens)
        self._wake = asyncio.Event()
        self._closing = False
        self._pool = pool or RuntimeThread()
        self._task: asyncio.Task | None = None
        self._tokens_per_s = 0.0                         # recent throughput (padded tokens a second), for Retry-After

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="millis-batcher")

    def submit(self, job: Job) -> None:
        """Queue a request's rows, or raise Overloaded / ShuttingDown without queueing any."""
        if self._closing:
            raise ShuttingDown("server is shutting down")
        if job.tokens and self.infer_tokens is None:
            raise ValueError("this runtime gives no token states")
        n = len(job.rows)
        # admitted while fewer than max_queue rows wait, whatever its size (the queue may go past by up to
        # --max-inputs - 1): `depth + n > max_queue` refused every 64-text request under steady small ones. A gone
        # request's rows wait for nothing: they 429'd others until the running call ended and they were popped
        waiting = self.depth - self.gone_rows
        if waiting >= self.max_queue:
            raise Overloaded(waiting, self.retry_after_s())
        for i, ids in enumerate(job.rows):
            self._queues.setdefault((bucket_length(len(ids), self.max_length), job.tokens), deque()).append((job, i))
        self.depth += n
        job.queued, job.on_drop = n, self._dropped
        self._wake.set()

    def retry_after_s(self) -> int:
        """Seconds until the queue has run, at the recent rate: its rows' padded tokens (gone ones too: they are
        popped, not run) over the tokens a second calls took; 1 before any call, at most MAX_RETRY_AFTER_S. Rows
        were counted alike, and the rate started from 0: a fresh server that ran its flood in 2 s said 39."""
        if self._tokens_per_s <= 0:
            return 1
        queued = sum(len(q) * t for (t, _), q in self._queues.items())
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(queued / self._tokens_per_s)))

    def expire(self, exc: Exception) -> int:
        """Drop every queued request none of whose rows has started (the drain's limit is near: they are answered
        `exc` now, not cut off by the server's exit); the number dropped. Their rows are skipped when popped."""
        self._closing = True  # and nothing more is admitted: a request that came later would be cut off too
        jobs = {id(j): j for q in self._queues.values() for j, _ in q if not j.gone and j.queue_s < 0}
        for job in jobs.values():
            job.drop(exc)
        return len(jobs)

    async def close(self) -> None:
        """Admit nothing more, run every queued row, then stop the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown(wait=True)

    # ---- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if self.depth == 0:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_wait_s > 0 and not self._closing and not self.one_row_per_call:  # nothing to wait for
                await self._coalesce()
            picked = self._take()
            if picked is None:
                continue
            (t, tokens), rows = picked
            infer = self.infer_tokens if tokens else self.infer
            t0 = perf_counter()
            jobs = list({id(j): j for j, _ in rows}.values())  # the requests this batch serves, once each
            for job in jobs:
                if job.queue_s < 0:
                    job.queue_s = t0 - job.t_submit
            try:
                y = await self._pool.call(infer, [j.rows[i] for j, i in rows], t)
                err = None
            except Exception as e:  # a runtime failure fails this batch's requests, not the server
                y, err = None, e
            dt = perf_counter() - t0
            rate = len(rows) * t / max(dt, 1e-6)  # the first call's rate as it is, then a moving average
            self._tokens_per_s = rate if self._tokens_per_s <= 0 else 0.8 * self._tokens_per_s + 0.2 * rate
            if self.on_batch:
                self.on_batch(len(rows), len(rows) * t, dt)
            for job in jobs:
                job.infer_s += dt
                job.batch_rows.append(len(rows))
            if err is not None and len(jobs) > 1:
                await self._each_alone(jobs, rows, t, infer)
            else:
                self._finish(rows, y, err)

    async def _each_alone(self, jobs: list[Job], rows: list[tuple[Job, int]], t: int, infer: InferFn) -> None:
        """A batch of several requests failed: each request's rows run again on their own, so the one whose
        rows fail (a row the runtime cannot take) fails alone and its batch-mates are answered. At most one
        call a request of the batch (max_batch rows): bounded, and only after a failure."""
        for job in jobs:
            mine = [(j, i) for j, i in rows if j is job]
            t0 = perf_counter()
            try:
                y, err = await self._pool.call(infer, [job.rows[i] for _, i in mine], t), None
            except Exception as e:  # this request's own rows fail: it alone gets the error
                y, err = None, e
            job.infer_s += perf_counter() - t0
            job.batch_rows.append(len(mine))
            self._finish(mine, y, err)

    def _oldest(self) -> tuple[tuple[int, bool], deque] | None:
        best = None
        for t, q in self._queues.items():
            if q and (best is None or q[0][0].t_submit < best[1][0][0].t_submit):
                best = (t, q)  # t: (bucket length, tokens)
        return best

    def _cap(self, t: int) -> int:
        return max(1, min(self.max_batch, self.max_tokens // t))

    async def _coalesce(self) -> None:
        """Wait until the oldest bucket holds a full batch or its head has waited max_wait_s."""
        while not self._closing:
            best = self._oldest()
            if best is None or len(best[1]) >= self._cap(best[0][0]):
                return
            remain = best[1][0][0].t_submit + self.max_wait_s - perf_counter()
            if remain <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remain)
            except TimeoutError:
                return

    def _dropped(self, job: Job) -> None:
        self.gone_rows += job.queued

    def _take(self) -> tuple[tuple[int, bool], list[tuple[Job, int]]] | None:
        """Pop up to one batch from the bucket whose head is oldest; gone rows are dropped."""
        best = self._oldest()
        if best is None:
            return None
        key, q = best
        cap, rows = self._cap(key[0]), []
        while q and len(rows) < cap:
            if self.one_row_per_call and rows:
                break
            job, i = q.popleft()
            self.depth -= 1
            job.queued -= 1
            if job.gone:
                self.gone_rows -= 1
            else:
                rows.append((job, i))
        return (key, rows) if rows else None

    def _finish(self, rows: list[tuple[Job, int]], y: np.ndarray | None, err: Exception | None) -> None:
        for k, (job, i) in enumerate(rows):
            if job.future.done():
                continue
            if err is not None:
                job.future.set_exception(RuntimeError(f"runtime failed: {err}"))
                continue
            job.out[i] = y[k, :len(job.rows[i])].copy() if job.tokens else y[k]  # (not a view of the batch)
            job.pending -= 1
            if job.pending == 0:
                job.future.set_result(None)


def timing_headers(job: Job, tokenize_s: float, cut: list[bool]) -> dict[str, str]:
    """A request's stage times (and the texts cut) as response headers."""
    q, i = max(job.queue_s, 0.0) * 1e3, job.infer_s * 1e3
    h = {"x-millis-queue-ms": f"{q:.3f}", "x-millis-tokenize-ms": f"{tokenize_s * 1e3:.3f}",
         "x-millis-inference-ms": f"{i:.3f}", "x-millis-batch-rows": ",".join(map(str, job.batch_rows)),
         "server-timing": f"queue;dur={q:.3f}, tokenize;dur={tokenize_s * 1e3:.3f}, inference;dur={i:.3f}"}
    if any(cut):
        h["x-millis-truncated"] = ",".join(str(k) for k, c in enumerate(cut) if c)
    return h

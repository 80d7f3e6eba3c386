"""The last 10 minutes of one server in 1-second buckets: what `/stats` answers and `/dashboard` draws.

Every observation point of `Metrics` also records here, at O(1) cost: the current second's row of a
ring of `SECONDS` rows is found from the clock and a few cells are incremented. Latencies go into a
fixed histogram per second with fine log buckets (`BUCKETS_PER_OCTAVE` per doubling, about 6% wide),
so percentiles over any span of seconds are a sum of rows: exact to within one bucket, at a fixed
memory (a histogram rather than a reservoir: merging seconds stays exact and costs no sampling).

Threads: each `Ring` has one writer thread, and only that thread moves it to a new second (clearing
the rows it enters), so a write never races a clear. `Live.req` is written on the event loop (answers,
stages, tokens); `Live.eng` by whoever runs batches (the event loop for the encoder, the engine thread
for generation). `/stats` reads both on the event loop without a lock: a row being written while it
is read is off by the observation in flight, which a dashboard does not mind.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

SECONDS = 600                   # the ring: 10 minutes of 1-second rows
SUMMARY_S = 60                  # the headline numbers cover the last minute
LO_S = 1e-5                     # the lowest histogram bucket starts at 10 us
BUCKETS_PER_OCTAVE = 12         # bucket i: [LO * 2^(i/12), LO * 2^((i+1)/12)), i.e. 5.9% wide
N_BUCKETS = 28 * BUCKETS_PER_OCTAVE  # up to LO * 2^28 = 45 min (a long generation); longer ones: the last bucket
RESOLUTION = 2 ** (1 / BUCKETS_PER_OCTAVE)  # the ratio of a bucket's ends
STATUS = ("2xx", "4xx", "429", "503", "5xx")  # answer classes; 429 and 503 (shedding) apart from 4xx / 5xx
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
# the routes whose served (2xx) answers are timed for the latency percentiles (cheap ones such as /v1/models,
# and the 429s of a server shedding load, would only pull them down); every answer still counts by status.
# TEI's routes (/embed, /embed_all, /embed_sparse, /similarity, /predict, /rerank) are model routes too
MODEL_ROUTES = frozenset({"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v2/rerank", "/v1/completions",
                          "/v1/chat/completions", "/embed", "/embed_all", "/embed_sparse", "/similarity", "/predict",
                          "/rerank", "/", "/invocations"})

# Live.req columns: answers by status class, then per-stage sums (seconds) and counts, then tokens
REQ_COLS = (*STATUS, "queue_s", "tokenize_s", "inference_s", "stages", "tokens")
# Live.eng columns: batches (a generation step is one), their rows / tokens / seconds, the largest batch,
# gauges as their largest value in the second, prompt and prefix-cache hit tokens admitted in the second
ENG_COLS = ("batches", "rows", "batch_tokens", "batch_s", "rows_max", "queue_depth", "running", "waiting",
            "kv_used", "prompt_tokens", "hit_tokens")
R = {c: i for i, c in enumerate(REQ_COLS)}
R_QUEUE, R_TOKENIZE, R_INFERENCE, R_STAGES, R_TOKENS = (R[c] for c in REQ_COLS[len(STATUS):])
(E_BATCHES, E_ROWS, E_TOKENS, E_SECONDS, E_ROWS_MAX, E_DEPTH, E_RUNNING, E_WAITING, E_KV, E_PROMPT,
 E_HITS) = range(len(ENG_COLS))


def status_class(status: int) -> int:
    """Index into STATUS; a 499 (client gone) is a 4xx, a 1xx/3xx (none today) counts as 2xx."""
    if status in (429, 503):
        return 2 if status == 429 else 3
    return 4 if status >= 500 else 1 if status >= 400 else 0


def bucket(seconds: float) -> int:
    if seconds <= LO_S:
        return 0
    return min(int(math.log2(seconds / LO_S) * BUCKETS_PER_OCTAVE), N_BUCKETS - 1)


def bucket_mid_s(i) -> np.ndarray:
    """The geometric middle of bucket(s) i: within half a bucket of any value in it."""
    return LO_S * 2 ** ((np.asarray(i) + 0.5) / BUCKETS_PER_OCTAVE)


def quantiles_ms(hist: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest-rank quantiles of histograms (..., N_BUCKETS) in ms (NaN where a histogram is empty):
    the middle of the first bucket whose cumulative count reaches ceil(q * n)."""
    cum = hist.cumsum(axis=-1)
    n = cum[..., -1:]
    out = {}
    for name, q in QUANTILES:
        rank = np.maximum(np.ceil(q * n - 1e-9), 1)
        idx = (cum < rank).sum(axis=-1)
        out[name] = np.where(n[..., 0] > 0, bucket_mid_s(np.minimum(idx, N_BUCKETS - 1)) * 1e3, np.nan)
    return out


class Ring:
    """Per-second rows for the SECONDS seconds up to `cur`: row `s % SECONDS` holds second s. `v[row]`
    are `cols` float sums, `h[k][row]` histogram k's N_BUCKETS counts. Plain lists, not numpy: an
    increment of a list item costs a third of a numpy item's, and /stats converts only what it reads."""

    def __init__(self, cols: int, hists: int, clock: Callable[[], float]):
        self.cols, self.clock = cols, clock
        self.v = [[0.0] * cols for _ in range(SECONDS)]
        self.h = [[[0] * N_BUCKETS for _ in range(SECONDS)] for _ in range(hists)]
        self.cur = int(clock())

    def row(self) -> int:
        """The current second's row, cleared first when the clock has moved on (O(1) amortised)."""
        s = int(self.clock())
        if s > self.cur:
            for t in range(max(self.cur + 1, s - SECONDS + 1), s + 1):
                i = t % SECONDS
                self.v[i] = [0.0] * self.cols
                for h in self.h:
                    h[i] = [0] * N_BUCKETS
            self.cur = s
        return self.cur % SECONDS

    def valid(self, sec: int) -> bool:
        """Whether row sec % SECONDS holds second sec (else: not reached yet, or overwritten: nothing)."""
        return self.cur - SECONDS < sec <= self.cur

    def values(self, secs: range) -> np.ndarray:  # (len(secs), cols)
        cur, zero, v = self.cur, [0.0] * self.cols, self.v
        return np.array([v[s % SECONDS] if cur - SECONDS < s <= cur else zero for s in secs], float)

    def hist(self, k: int, secs) -> np.ndarray:  # (len(secs), N_BUCKETS)
        cur, zero, h = self.cur, [0] * N_BUCKETS, self.h[k]
        return np.array([h[s % SECONDS] if cur - SECONDS < s <= cur else zero for s in secs], np.int64)


class Ended:
    """Numpy copies of one histogram of `ring`, and its p50/p90/p99, per second: a second that has ended
    never changes, so it is converted once and kept. Only for a ring written on the event loop, the
    thread that reads it (so an ended second cannot be written after the copy)."""

    def __init__(self, ring: Ring, k: int):
        self.ring, self.k = ring, k
        self.hist = np.zeros((SECONDS, N_BUCKETS), np.int64)
        self.q = np.full((SECONDS, len(QUANTILES)), np.nan)  # ms
        self.sec = np.full(SECONDS, -1, np.int64)             # the second each row holds; -1: none, or unfinished

    def update(self, secs: range, now: int) -> None:
        """Copy the seconds of `secs` not copied yet, and the current (unfinished) one again."""
        all_secs = np.arange(secs.start, secs.stop)
        todo = all_secs[(all_secs >= now) | (self.sec[all_secs % SECONDS] != all_secs)]
        if not len(todo):
            return
        rows = todo % SECONDS
        self.hist[rows] = self.ring.hist(self.k, todo.tolist())
        got = quantiles_ms(self.hist[rows])
        self.q[rows] = np.stack([got[name] for name, _ in QUANTILES], axis=1)
        self.sec[rows] = np.where(todo < now, todo, -1)

    def sum(self, secs: range) -> np.ndarray:  # (N_BUCKETS,) over secs, after update(secs)
        return self.hist[np.arange(secs.start, secs.stop) % SECONDS].sum(axis=0)

    def series(self, secs: range) -> dict[str, list[float | None]]:  # after update(secs)
        q = self.q[np.arange(secs.start, secs.stop) % SECONDS]
        return {name: _floats(q[:, j]) for j, (name, _) in enumerate(QUANTILES)}


class Live:
    """What Metrics records per second; `snapshot(window)` is the body of /stats less the app's facts."""

    def __init__(self, generation: bool = False, clock: Callable[[], float] = time.monotonic):
        self.generation, self.clock = generation, clock
        self.started = clock()
        self.wall0 = time.time() - self.started        # clock -> unix time, for the answer's `now`
        self.req = Ring(len(REQ_COLS), 3, clock)       # histograms: latency, TTFT, inter-token latency
        self.eng = Ring(len(ENG_COLS), 0, clock)
        self.ended = [Ended(self.req, k) for k in range(3)]  # latency, TTFT, ITL
        self.inflight = 0                              # admitted, not answered (event loop only)
        self._kv_second = -1                           # the engine thread's last KV sample
        self._prompt_seen = self._hit_seen = 0

    # ---- observation points (a few list increments each) ----------------------------------------
    def request(self, route: str, status: int, seconds: float) -> None:
        r = self.req.row()
        cls = status_class(status)
        self.req.v[r][cls] += 1
        if cls == 0 and route in MODEL_ROUTES:
            self.req.h[0][r][bucket(seconds)] += 1

    def stages(self, queue_s: float, tokenize_s: float, inference_s: float) -> None:
        v = self.req.v[self.req.row()]
        v[R_QUEUE] += queue_s
        v[R_TOKENIZE] += tokenize_s
        v[R_INFERENCE] += inference_s
        v[R_STAGES] += 1

    def batch(self, rows: int, tokens: int, seconds: float) -> None:
        v = self.eng.v[self.eng.row()]
        v[E_BATCHES] += 1
        v[E_ROWS] += rows
        v[E_TOKENS] += tokens
        v[E_SECONDS] += seconds
        if rows > v[E_ROWS_MAX]:
            v[E_ROWS_MAX] = rows

    def queue_depth(self, depth: int) -> None:
        v = self.eng.v[self.eng.row()]
        if depth > v[E_DEPTH]:
            v[E_DEPTH] = depth

    def engine(self, running: int, waiting: int, kv=None) -> None:
        """After a generation step (engine thread): slots running, requests waiting (the queue); once a
        second the paged KV cache's blocks in use and the prompt / prefix-hit tokens admitted since."""
        v = self.eng.v[self.eng.row()]
        v[E_RUNNING] = max(v[E_RUNNING], running)
        v[E_WAITING] = max(v[E_WAITING], waiting)
        v[E_DEPTH] = max(v[E_DEPTH], waiting)
        if kv is not None and self.eng.cur != self._kv_second:
            self._kv_second = self.eng.cur
            v[E_KV] = kv.in_use
            v[E_PROMPT] += kv.prompt_tokens - self._prompt_seen
            v[E_HITS] += kv.hit_tokens - self._hit_seen
            self._prompt_seen, self._hit_seen = kv.prompt_tokens, kv.hit_tokens

    def ttft(self, seconds: float) -> None:
        self.req.h[1][self.req.row()][bucket(seconds)] += 1

    def itl(self, seconds: float) -> None:
        self.req.h[2][self.req.row()][bucket(seconds)] += 1

    def tokens(self, n: int) -> None:
        self.req.v[self.req.row()][R_TOKENS] += n

    # ---- /stats ------------------------------------------------------------------------------
    def snapshot(self, window: int) -> dict:
        """Per-second series of the last `window` seconds (oldest first, the current second last: counts so
        far) and the summary of the last SUMMARY_S seconds (rates over the time they cover). Empty seconds read 0 for counts, null for means and
        percentiles. Costs O(window) plus the percentiles of the seconds not seen by the last call."""
        window = min(max(int(window), 1), SECONDS)
        now = self.clock()
        end = int(now)
        secs, last = range(end - window + 1, end + 1), range(end - SUMMARY_S + 1, end + 1)
        span = range(end - max(window, SUMMARY_S) + 1, end + 1)
        for h in self.ended if self.generation else self.ended[:1]:
            h.update(span, end)
        req, eng = self.req.values(secs), self.eng.values(secs)            # (window, cols)
        sreq, seng = self.req.values(last).sum(axis=0), self.eng.values(last).sum(axis=0)  # (cols,)
        status = {c: req[:, R[c]] for c in STATUS}
        series: dict = {"t": list(range(1 - window, 1)), "requests": _ints(sum(status.values())),
                        "status": {c: _ints(v) for c, v in status.items()},
                        "latency_ms": self.ended[0].series(secs),
                        "queue_ms": _floats(_div(req[:, R_QUEUE], req[:, R_STAGES]) * 1e3),
                        "tokenize_ms": _floats(_div(req[:, R_TOKENIZE], req[:, R_STAGES]) * 1e3),
                        "inference_ms": _floats(_div(req[:, R_INFERENCE], req[:, R_STAGES]) * 1e3),
                        "batch_ms": _floats(_div(eng[:, E_SECONDS], eng[:, E_BATCHES]) * 1e3),
                        "batches": _ints(eng[:, E_BATCHES]),
                        "batch_rows": _floats(_div(eng[:, E_ROWS], eng[:, E_BATCHES])),
                        "batch_rows_max": _ints(eng[:, E_ROWS_MAX]),
                        "queue_depth": _ints(eng[:, E_DEPTH])}
        counts = {c: int(sreq[R[c]]) for c in STATUS}
        total, lat = sum(counts.values()), self.ended[0].sum(last)
        # the time the summary's seconds cover: 59 and the current second's elapsed part, less before the start
        covered = max(min(SUMMARY_S - 1 + (now - end), now - self.started), 1.0)
        summary: dict = {"seconds": SUMMARY_S, "requests": total, "requests_per_s": round(total / covered, 3),
                         "status": counts, "shedding": counts["429"] + counts["503"],
                         "latency_ms": _pcts(lat), "latency_samples": int(lat.sum()),
                         "queue_ms": _one(_div(sreq[R_QUEUE], sreq[R_STAGES]) * 1e3),
                         "tokenize_ms": _one(_div(sreq[R_TOKENIZE], sreq[R_STAGES]) * 1e3),
                         "inference_ms": _one(_div(sreq[R_INFERENCE], sreq[R_STAGES]) * 1e3),
                         "batch_ms": _one(_div(seng[E_SECONDS], seng[E_BATCHES]) * 1e3),
                         "batches_per_s": round(float(seng[E_BATCHES]) / covered, 3),
                         "batch_rows": _one(_div(seng[E_ROWS], seng[E_BATCHES]))}
        if self.generation:
            series.update(ttft_ms=self.ended[1].series(secs), itl_ms=self.ended[2].series(secs),
                          tokens_per_s=_ints(req[:, R_TOKENS]),
                          running=_ints(eng[:, E_RUNNING]), waiting=_ints(eng[:, E_WAITING]),
                          kv_blocks_used=_ints(eng[:, E_KV]),
                          prefix_hit_rate=_floats(_div(eng[:, E_HITS], eng[:, E_PROMPT])))
            summary.update(ttft_ms=_pcts(self.ended[1].sum(last)), itl_ms=_pcts(self.ended[2].sum(last)),
                           tokens=int(sreq[R_TOKENS]), tokens_per_s=round(float(sreq[R_TOKENS]) / covered, 3),
                           prefix_hit_rate=_one(_div(seng[E_HITS], seng[E_PROMPT])))
        return {"now": round(self.wall0 + now, 3), "window_s": window, "series": series, "summary": summary}


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) > 0, np.asarray(a, float) / np.maximum(b, 1e-300), np.nan)


def _one(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 3)


def _floats(a: np.ndarray) -> list[float | None]:
    a = np.round(np.asarray(a, float), 3)
    nan = np.isnan(a)
    return np.where(nan, None, a).tolist() if nan.any() else a.tolist()


def _ints(a: np.ndarray) -> list[int]:
    return np.asarray(a).astype(np.int64).tolist()


def _pcts(hist: np.ndarray) -> dict[str, float | None]:
    return {k: _one(v) for k, v in quantiles_ms(hist).items()}

"""Load levels against an HTTP endpoint: closed loop (N clients back to back) and open loop
(Poisson arrivals at a rate), each bounded by a duration and optionally a request count.

Open-loop latency is measured from each request's scheduled send time, so a server that falls
behind is charged for the wait (no coordinated omission). Closed-loop latency is each client's
service time: a client waits for its answer before it sends again, so a server that stalls sends
fewer requests meanwhile and the stall weighs less in the percentiles than it would for a user
(coordinated omission, by construction): read closed-loop rows as capacity, open-loop rows as the
latency users see; the plot draws them as separate lines. A level's summary counts every request
sent once: answered 2xx (ok), 429 (rejected), 503 (shed: timed out in the server's queue, or it is
shutting down), other statuses or broken connections (errors), and no answer (connecting included)
within the timeout (timeouts).

Throughput is over the level's sending window (its duration; with --count, open loop: until the
arrival past the count; closed loop, whose clients send back to back: until the count's last answer):
rps counts the 2xx answered within it, offered_rps everything sent in it; the wait for the last
answers after it is drain_s, never stretching the window. A request the client could not send (its
own file descriptors ran out: EMFILE) is `client_limit`, with a warning, never a server error, and
out of the percentiles. Latency percentiles are over every request
not refused with 429: one that timed out, failed or was shed counts as lasting at least the timeout,
so a percentile that lands on one is no latency (null, its key in `beyond_timeout`); answered_p99_ms
is over the answered (2xx and 429) alone. Each request's send lag (how late the client sent it) is
recorded: a p99 past max(1 ms, 5% of p50) means the client, not the server, may set the pace; so is
the client's own CPU over the level (client_cpu, a share of one core: 0.9 or more warns). Percentiles
interpolate linearly between ranks (numpy's default); `n` is the count they rank, and under 100 a p99
is read as about the largest (a warning says so).
"""
from __future__ import annotations

import asyncio
import errno
import math
import random
import re
import time
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Awaitable, Callable

import numpy as np

from millis.common.errors import MillisError
from millis.loadgen.client import Conn, Pool, Target


@dataclass(frozen=True)
class Level:
    kind: str          # "closed" | "open"
    value: float       # concurrency (closed) or requests/s (open)
    label: str = ""    # e.g. c16, poisson50; default from kind and value

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return f"c{int(self.value)}" if self.kind == "closed" else f"r{self.value:g}"


INTEGER = re.compile(r"\+?[0-9]+")
NUMBER = re.compile(r"\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # float() also takes inf, nan, 1_0


def parse_levels(concurrency: str, rate: str) -> list[Level]:
    levels = []
    for c in (c.strip() for c in concurrency.split(",")):
        if c and (INTEGER.fullmatch(c) is None or int(c) < 1):
            raise MillisError(f"--concurrency takes integers >= 1, comma-separated; got {c!r} in {concurrency!r}")
        levels += [Level("closed", int(c))] if c else []
    for r in (r.strip() for r in rate.split(",")):
        # inf arrivals/s would create tasks without end (expovariate(inf) = 0), 1e999 is inf
        if r and (NUMBER.fullmatch(r) is None or not math.isfinite(float(r)) or float(r) <= 0):
            raise MillisError(f"--rate takes finite numbers > 0 (requests/s), comma-separated; got {r!r} in {rate!r}")
        levels += [Level("open", float(r))] if r else []
    if not levels:
        raise MillisError("give at least one --concurrency or --rate")
    return levels


class Recorder:
    def __init__(self) -> None:
        self.lat: list[float] = []      # seconds from the scheduled send to the outcome, per request
        self.status: list[int] = []     # HTTP status; 0 = broken connection, -1 = timed out
        self.done: list[float] = []     # perf_counter() at each outcome
        self.lag: list[float] = []      # seconds each request was sent after its scheduled time
        self.t_first = self.t_last = 0.0
        # end of the sending window; None: throughput over t_first..t_last (callers that set those)
        self.t_end: float | None = None

    def add(self, latency: float, status: int, t_done: float, lag: float | None = None) -> None:
        self.lat.append(latency)
        self.status.append(status)
        self.done.append(t_done)
        if lag is not None:
            self.lag.append(lag)
        self.t_last = max(self.t_last, t_done)


async def _one(pool: Pool, raw: bytes, timeout: float, rec: Recorder, t_sched: float) -> None:
    t_send = perf_counter()
    try:
        async with asyncio.timeout(timeout):  # connecting included: a server that never accepts is a timeout
            status = await pool.send(raw)
    except TimeoutError:
        status = -1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        status = failed(e)
    t = perf_counter()
    rec.add(t - t_sched, status, t, t_send - t_sched)


CLIENT_LIMIT = -3  # the client ran out of file descriptors: the request was never sent (not the server's)


def failed(e: BaseException) -> int:
    """The status of a request that raised `e`: 0 (a broken connection, a bad answer) or CLIENT_LIMIT."""
    return CLIENT_LIMIT if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE) else 0


def client_limit_warning(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("client_limit"):
        row["warnings"].append(f"client limit: {row['client_limit']} requests were never sent (the client ran out "
                               f"of file descriptors; raise `ulimit -n` or lower the load)")
    return row


async def closed_loop(t: Target, make: Callable[[], bytes], n: int, duration: float, count: int,
                      timeout: float) -> Recorder:
    rec, stop_at = Recorder(), perf_counter() + duration
    rec.t_end, sent = stop_at, 0

    async def client() -> None:
        nonlocal sent
        pool = Pool(t)
        while perf_counter() < stop_at and (not count or sent < count):
            sent += 1
            t0 = perf_counter()
            await _one(pool, make(), timeout, rec, t0)
        pool.close()

    rec.t_first = perf_counter()
    await asyncio.gather(*(client() for _ in range(n)))
    if count and sent >= count:
        # the count's last answer ends the window: a client that finds nothing left to send is idle, not the
        # end (with count < clients the idle ones ended it at once: rps 0; else the answers in flight fell out)
        rec.t_end = min(rec.t_end, rec.t_last)
    return rec


async def poisson(rate: float, duration: float, count: int, seed: int, start: float,
                  launch: Callable[[float], Awaitable[Any]]) -> tuple[list[asyncio.Task], float]:
    """launch(scheduled time) at Poisson arrivals from start -> the tasks and the end of the sending
    window: the duration, or the next arrival once `count` were sent, or later when the client sent late."""
    rng, tasks, t_next, loop = random.Random(seed), [], start, asyncio.get_running_loop()
    while True:
        t_next += rng.expovariate(rate)
        if t_next - start > duration or (count and len(tasks) >= count):
            break
        # the loop's timer (epoll_wait) wakes on whole milliseconds, up to 1 ms late: a lag charged to every
        # open-loop latency (0.7 ms at p50 on a 1 ms server). The last millisecond is slept in a thread instead
        if (delay := t_next - perf_counter()) > 1e-3:
            await asyncio.sleep(delay - 1e-3)
        if (rest := t_next - perf_counter()) > 0:
            await loop.run_in_executor(None, time.sleep, rest)
        tasks.append(asyncio.create_task(launch(t_next)))
    return tasks, max(start + min(t_next - start, duration), perf_counter())


async def open_loop(t: Target, make: Callable[[], bytes], rate: float, duration: float, count: int,
                    timeout: float, seed: int) -> Recorder:
    rec, pool = Recorder(), Pool(t)
    rec.t_first = perf_counter()
    tasks, rec.t_end = await poisson(rate, duration, count, seed, rec.t_first,
                                     lambda t_sched: _one(pool, make(), timeout, rec, t_sched))
    await asyncio.gather(*tasks)
    pool.close()
    return rec


def percentiles(lat_ms: np.ndarray, ok: np.ndarray, qs: dict[str, float], digits: int) -> tuple[dict, list[str]]:
    """{key: q-th percentile} of latencies where a request not answered 2xx lasts at least the timeout
    (it is ranked above every answer): a percentile that lands on one is not a latency but a bound, so it
    is None and its key is listed. Survivors alone would hide the slow tail (5% timeouts gave p99 3 ms)."""
    vals = np.sort(np.where(ok, lat_ms, np.inf))
    out, beyond = {}, []
    for key, q in qs.items():
        if not len(vals):
            out[key] = None
            continue
        if not np.isfinite(vals[math.ceil(q / 100 * (len(vals) - 1))]):
            out[key] = None
            beyond.append(key)
        else:
            out[key] = round(float(np.percentile(vals, q)), digits)
    return out, beyond


def few_samples_warning(row: dict[str, Any]) -> dict[str, Any]:
    n = row.get("n") or 0
    if 0 < n < 100:
        row["warnings"].append(f"few samples: p99 over {n} latencies is interpolated between the largest ones "
                               f"(read it as about the max); run longer for a p99")
    return row


def client_cpu(row: dict[str, Any], cpu_s: float, wall_s: float) -> dict[str, Any]:
    """The row with the client's CPU over the level (a share of one core) and a warning from 0.9: the load
    generator's event loop is one core, and near it the client, not the server, sets the latencies."""
    row["client_cpu"] = share = round(cpu_s / max(wall_s, 1e-9), 3)
    if share >= 0.9:
        row["warnings"].append(f"client CPU: the load generator used {share:.0%} of a core: its own delays are in "
                               f"these latencies; run it on another machine or lower the load")
    return row


async def probe_ms(t: Target, make: Callable[[], bytes], n: int, timeout: float) -> list[float]:
    """n requests one after another on a fresh connection: each one's ms (timeout or not 2xx: the timeout's)."""
    out = []
    try:
        c = await asyncio.wait_for(Conn.connect(t), timeout)
    except (OSError, TimeoutError):
        return [timeout * 1e3] * n
    try:
        for _ in range(n):
            t0 = perf_counter()
            try:
                status, _, _ = await asyncio.wait_for(c.send(make()), timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                out.append(timeout * 1e3)
                break
            out.append((perf_counter() - t0) * 1e3 if 200 <= status < 300 else timeout * 1e3)
    finally:
        c.close()
    return out


def quiet_limit_ms(idle_ms: float) -> float:
    """A request answered within this is answered about as fast as on the idle server."""
    return max(3 * idle_ms, idle_ms + 10)


async def settle(probe: Callable[[], Awaitable[float]], limit_ms: float, cap_s: float = 120.0) -> tuple[float, bool]:
    """Probes one at a time until one is answered within limit_ms -> (seconds waited, settled). After a level
    that overloaded the server, it may still work through requests the client gave up on: the next level
    would be charged for them (a 30 req/s level after a 100 req/s one timed out every request)."""
    t0 = perf_counter()
    while perf_counter() - t0 < cap_s:
        if await probe() <= limit_ms:
            return round(perf_counter() - t0, 3), True
        await asyncio.sleep(0.2)
    return round(perf_counter() - t0, 3), False


def settle_note(row: dict[str, Any], waited_s: float, settled: bool) -> dict[str, Any]:
    row["settle_s"] = waited_s
    if not settled:
        row["warnings"].append(f"not settled: the server was still slow {waited_s:g} s after the previous level; "
                               f"this level may carry its backlog")
    return row


def check_lag(row: dict[str, Any], lag_s: list[float]) -> dict[str, Any]:
    """The row with send_lag_p99_ms and its warnings: a client that sends late (its own CPU, a blocked
    loop) caps the load it offers and adds its lag to every latency."""
    p99 = round(float(np.percentile(lag_s, 99)) * 1e3, 3) if lag_s else None
    limit = max(1.0, 0.05 * (row.get("p50_ms") or 0.0))
    row["send_lag_p99_ms"], row["warnings"] = p99, []
    if p99 is not None and p99 > limit:
        row["warnings"].append(f"client lag: send lag p99 {p99:g} ms > {limit:g} ms (max of 1 ms, 5% of p50): "
                               f"the client sent late; its delay is in these latencies and may cap the load offered")
    return row


def summarize(level: Level, rec: Recorder) -> dict[str, Any]:
    st = np.asarray(rec.status)
    lat = np.asarray(rec.lat) * 1e3
    ok = (st >= 200) & (st < 300)
    rejected, shed, timeouts, unsent = st == 429, st == 503, st == -1, st == CLIENT_LIMIT
    if rec.t_end is not None and len(rec.done) == len(st):
        window, drain = max(rec.t_end - rec.t_first, 1e-9), max(rec.t_last - rec.t_end, 0.0)
        served = ok & (np.asarray(rec.done) <= rec.t_end)
    else:  # a caller's own recording: its t_first..t_last is the window
        window, drain, served = max(rec.t_last - rec.t_first, 1e-9), 0.0, ok

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)), 3) if len(x) else None

    answered = lat[ok | rejected]
    asked = ~rejected & ~unsent
    pcts, beyond = percentiles(lat[asked], ok[asked], {"p50_ms": 50, "p90_ms": 90, "p99_ms": 99, "max_ms": 100}, 3)
    row = {"load": level.name, "kind": level.kind, "value": level.value, "sent": int(len(st)), "n": int(asked.sum()),
           "ok": int(ok.sum()), "rejected": int(rejected.sum()), "shed": int(shed.sum()),
           "errors": int((~ok & ~rejected & ~shed & ~timeouts & ~unsent).sum()), "timeouts": int(timeouts.sum()),
           "client_limit": int(unsent.sum()),
           "answered_share": round(float((ok | rejected).mean()), 4) if len(st) else None,
           **pcts, "beyond_timeout": beyond, "answered_p99_ms": pct(answered, 99),
           "rps": round(float(served.sum()) / window, 1), "offered_rps": round(len(st) / window, 1),
           "window_s": round(window, 3), "drain_s": round(drain, 3)}
    return client_limit_warning(few_samples_warning(check_lag(row, rec.lag)))


async def run_level(t: Target, make: Callable[[], bytes], level: Level, duration: float, count: int,
                    timeout: float, seed: int = 0) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), perf_counter()
    if level.kind == "closed":
        rec = await closed_loop(t, make, int(level.value), duration, count, timeout)
    else:
        rec = await open_loop(t, make, level.value, duration, count, timeout, seed)
    return client_cpu(summarize(level, rec), time.process_time() - cpu0, perf_counter() - wall0)


async def warm(t: Target, make: Callable[[], bytes], n: int, timeout: float) -> float:
    """n sequential requests, not recorded: connections, caches and the server's buckets settle. Through a
    Pool, as the levels send: a server that closes each connection gets a new one (it raised before).
    -> the median ms of the last half (the warm server's latency; 0 when n is 0)."""
    pool, ms = Pool(t), []
    try:
        for _ in range(n):
            t0 = perf_counter()
            await asyncio.wait_for(pool.send(make()), timeout)
            ms.append((perf_counter() - t0) * 1e3)
    finally:
        pool.close()
    return float(np.median(ms[len(ms) // 2:])) if ms else 0.0

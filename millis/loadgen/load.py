"""Load levels against an HTTP endpoint: closed loop (N clients back to back) and open loop
(Poisson arrivals at a rate), each bounded by a duration and optionally a request count.

Open-loop latency is measured from each request's scheduled send time, so a server that falls
behind is charged for the wait (no coordinated omission). A level's summary counts every request
sent: answered 2xx (ok), 429 (rejected), other statuses or broken connections (errors), and no
answer within the timeout (timeouts).
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable

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


def parse_levels(concurrency: str, rate: str) -> list[Level]:
    levels = []
    try:
        levels += [Level("closed", int(c)) for c in concurrency.split(",") if c.strip()]
        levels += [Level("open", float(r)) for r in rate.split(",") if r.strip()]
    except ValueError:
        raise MillisError(f"--concurrency takes integers and --rate numbers, comma-separated; got "
                          f"{concurrency!r} / {rate!r}") from None
    if not levels or any(lv.value <= 0 for lv in levels):
        raise MillisError("give at least one positive --concurrency or --rate")
    return levels


class Recorder:
    def __init__(self) -> None:
        self.lat: list[float] = []      # seconds, per answered request
        self.status: list[int] = []     # HTTP status; 0 = broken connection, -1 = timed out
        self.t_first = self.t_last = 0.0

    def add(self, latency: float, status: int, t_done: float) -> None:
        self.lat.append(latency)
        self.status.append(status)
        self.t_last = max(self.t_last, t_done)


async def _one(pool: Pool, raw: bytes, timeout: float, rec: Recorder, t_sched: float) -> None:
    conn, ok = None, False
    try:
        conn = await pool.acquire()
        status, _, _ = await asyncio.wait_for(conn.send(raw), timeout)
        ok = True
    except asyncio.TimeoutError:
        status = -1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        status = 0
    t = perf_counter()
    if conn is not None:
        pool.release(conn, ok)
    rec.add(t - t_sched, status, t)


async def closed_loop(t: Target, make: Callable[[], bytes], n: int, duration: float, count: int,
                      timeout: float) -> Recorder:
    rec, stop_at = Recorder(), perf_counter() + duration
    sent = 0

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
    return rec


async def open_loop(t: Target, make: Callable[[], bytes], rate: float, duration: float, count: int,
                    timeout: float, seed: int) -> Recorder:
    rng, rec, pool = random.Random(seed), Recorder(), Pool(t)
    tasks: list[asyncio.Task] = []
    start = rec.t_first = perf_counter()
    t_next = start
    while True:
        t_next += rng.expovariate(rate)
        if t_next - start > duration or (count and len(tasks) >= count):
            break
        delay = t_next - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(pool, make(), timeout, rec, t_next)))
    await asyncio.gather(*tasks)
    pool.close()
    return rec


def summarize(level: Level, rec: Recorder) -> dict[str, Any]:
    st = np.asarray(rec.status)
    lat = np.asarray(rec.lat) * 1e3
    ok = (st >= 200) & (st < 300)
    rejected = st == 429
    span = max(rec.t_last - rec.t_first, 1e-9)

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)), 3) if len(x) else None

    answered = lat[ok | rejected]
    return {"load": level.name, "kind": level.kind, "value": level.value, "sent": int(len(st)),
            "ok": int(ok.sum()), "rejected": int(rejected.sum()),
            "errors": int((~ok & ~rejected & (st != -1)).sum()), "timeouts": int((st == -1).sum()),
            "answered_share": round(float((ok | rejected).mean()), 4) if len(st) else None,
            "p50_ms": pct(lat[ok], 50), "p90_ms": pct(lat[ok], 90), "p99_ms": pct(lat[ok], 99),
            "max_ms": pct(lat[ok], 100), "answered_p99_ms": pct(answered, 99),
            "rps": round(float(ok.sum()) / span, 1), "offered_rps": round(len(st) / span, 1)}


async def run_level(t: Target, make: Callable[[], bytes], level: Level, duration: float, count: int,
                    timeout: float, seed: int = 0) -> dict[str, Any]:
    if level.kind == "closed":
        rec = await closed_loop(t, make, int(level.value), duration, count, timeout)
    else:
        rec = await open_loop(t, make, level.value, duration, count, timeout, seed)
    return summarize(level, rec)


async def warm(t: Target, make: Callable[[], bytes], n: int, timeout: float) -> None:
    """n sequential requests, not recorded: connections, caches and the server's buckets settle."""
    c = await Conn.connect(t)
    try:
        for _ in range(n):
            await asyncio.wait_for(c.send(make()), timeout)
    finally:
        c.close()

"""Generation load: streamed OpenAI completions, timed token by token.

Each request is sent with `stream: true` on its own connection and its server-sent events are read
as they arrive: time to first token (TTFT, from the scheduled send time in open loop, so a server
that falls behind is charged for the queue), the gaps between content events (inter-token latency,
ITL), and the output tokens (the last event's `usage` when the server sends one, else the content
events). A level's summary: TTFT / ITL / end-to-end percentiles, output tokens/s over the level,
and goodput, the share of all requests sent that were answered with TTFT and mean ITL within budget.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable

import numpy as np
import orjson

from millis.loadgen.client import Conn, Target
from millis.loadgen.load import Level


@dataclass
class Streamed:
    status: int = 0                  # HTTP status; 0 = broken connection, -1 = timed out
    ttft: float | None = None        # seconds from the scheduled send to the first content event
    gaps: list[float] = field(default_factory=list)  # seconds between content events
    tokens: int = 0
    e2e: float | None = None


def _content(event: dict) -> str:
    ch = (event.get("choices") or [{}])[0]
    delta = ch.get("delta") or {}
    return ch.get("text") or delta.get("content") or ("x" if delta.get("tool_calls") else "")


async def _read_stream(c: Conn, out: Streamed, t_sched: float) -> None:
    head = await c.reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    out.status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if out.status != 200 or headers.get("transfer-encoding", "").lower() != "chunked":
        return
    buf, last, events = b"", None, 0
    while True:
        size = int((await c.reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            return
        buf += await c.reader.readexactly(size)
        await c.reader.readexactly(2)
        *done, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
        now = perf_counter()
        for ev in done:
            if not ev.startswith(b"data: ") or ev[6:].strip() == b"[DONE]":
                continue
            body = orjson.loads(ev[6:])
            if body.get("usage"):
                out.tokens = int(body["usage"].get("completion_tokens") or out.tokens)
            if _content(body):
                events += 1
                if last is None:
                    out.ttft = now - t_sched
                else:
                    out.gaps.append(now - last)
                last = now
                out.tokens = max(out.tokens, events)


async def stream_one(t: Target, raw: bytes, timeout: float, t_sched: float) -> Streamed:
    out, c = Streamed(), None
    try:
        c = await Conn.connect(t)
        c.writer.write(raw)
        await asyncio.wait_for(_read_stream(c, out, t_sched), timeout)
    except asyncio.TimeoutError:
        out.status = -1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        out.status = 0
    finally:
        if c is not None:
            c.close()
    out.e2e = perf_counter() - t_sched
    return out


async def gen_level(t: Target, make: Callable[[], bytes], level: Level, duration: float, count: int,
                    timeout: float, seed: int) -> tuple[list[Streamed], float]:
    """Every request's record and the level's span in seconds."""
    results: list[Streamed] = []
    start = perf_counter()
    if level.kind == "closed":
        stop_at = start + duration

        async def client() -> None:
            while perf_counter() < stop_at and (not count or len(results) < count):
                results.append(Streamed())  # holds the count while in flight
                k = len(results) - 1
                results[k] = await stream_one(t, make(), timeout, perf_counter())

        await asyncio.gather(*(client() for _ in range(int(level.value))))
    else:
        rng, tasks, t_next = random.Random(seed), [], start
        while True:
            t_next += rng.expovariate(level.value)
            if t_next - start > duration or (count and len(tasks) >= count):
                break
            if (delay := t_next - perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(t, make(), timeout, t_next)))
        results = list(await asyncio.gather(*tasks))
    return results, perf_counter() - start


def gen_summary(level: Level, results: list[Streamed], span: float, ttft_budget_s: float,
                itl_budget_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    ttft = np.array([r.ttft for r in ok]) * 1e3
    gaps = np.array([g for r in ok for g in r.gaps]) * 1e3
    e2e = np.array([r.e2e for r in ok]) * 1e3
    good = [r for r in ok if r.ttft <= ttft_budget_s and (not r.gaps or np.mean(r.gaps) <= itl_budget_s)]

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)), 2) if len(x) else None

    tokens = sum(r.tokens for r in ok)
    speed = np.array([len(r.gaps) / sum(r.gaps) for r in ok if r.gaps and sum(r.gaps) > 0])  # each request's own
    return {"load": level.name, "kind": level.kind, "value": level.value, "sent": len(results), "ok": len(ok),
            "rejected": sum(r.status == 429 for r in results), "timeouts": sum(r.status == -1 for r in results),
            "errors": sum(r.status not in (200, 429, -1) for r in results),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99), "e2e_p50_ms": pct(e2e, 50),
            "e2e_p99_ms": pct(e2e, 99), "output_tokens": tokens, "output_tok_s": round(tokens / span, 2),
            "request_tok_s_p50": pct(speed, 50), "rps": round(len(ok) / span, 3), "goodput": round(len(good) / len(results), 4) if results else None,
            "seconds": round(span, 2), "p50_ms": pct(ttft, 50), "p99_ms": pct(ttft, 99)}  # p50/p99: TTFT (the plot's)

"""Generation load: streamed OpenAI completions, timed token by token.

Each request is sent with `stream: true` on its own connection and its server-sent events are read
as they arrive: time to first token (TTFT, from the scheduled send time in open loop, so a server
that falls behind is charged for the queue), the gaps between content events (ITL: inter-event,
as a client sees them), and the output tokens (the last event's `usage` when the server sends one, else the content events). A server may
put several tokens in one event (speculative decoding, text held back for a stop string or a split
UTF-8 character), so a gap is not a token's time: each request's time per output token after the
first (TPOT: (last content - first content) / (tokens - 1)) is, and its tokens/s and goodput read it.
A level's summary: TTFT / ITL / TPOT / end-to-end percentiles, tokens per event, output tokens/s over
the level, and goodput, the share of all requests sent that were answered with TTFT and TPOT within
budget.

As in `load.py`: every request sent is counted once (ok, rejected 429, shed 503, errors, timeouts; a
200 that streams no content, or answers a streaming request unstreamed, is the error `empty_stream`;
one whose stream carries an error event, the error `stream_error`, whatever it streamed before);
TTFT and end-to-end percentiles rank a request that was not answered above the timeout (null when one
decides them); rps and output tokens/s count what arrived within the sending window.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Callable

import numpy as np
import orjson

from millis.loadgen.client import Conn, Target
from millis.loadgen.load import (CLIENT_LIMIT, Level, check_lag, client_limit_warning, failed, few_samples_warning,
                                 percentiles, poisson)

EMPTY = -2  # a 200 without a streamed content event
STREAM_ERROR = -4  # a 200 whose stream carried an error event (the server failed it after the headers)


@dataclass
class Streamed:
    status: int = 0                  # HTTP status; 0 = broken connection, -1 = timed out, EMPTY, STREAM_ERROR
    ttft: float | None = None        # seconds from the scheduled send to the first content event
    gaps: list[float] = field(default_factory=list)  # seconds between content events
    tokens: int = 0
    events: int = 0                  # content events (a server may send several tokens in one)
    e2e: float | None = None
    lag: float = 0.0                 # seconds the request was sent after its scheduled time
    at: float = 0.0                  # seconds from the level's start to the scheduled send (gen_level)


def _content(event: Any) -> str:
    if not isinstance(event, dict):  # an event whose data is JSON but no object: no content
        return ""
    choices = event.get("choices")
    ch = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    delta = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
    text = ch.get("text") or delta.get("content") or ("x" if delta.get("tool_calls") else "")
    return text if isinstance(text, str) else ""


def events_of(buf: bytes) -> tuple[list[bytes], bytes]:
    """(the data of each whole server-sent event in buf, the rest). Lines end in \\n, \\r\\n or \\r and an
    event at a blank line; its `data:` lines (one space after the colon dropped) are joined by \\n, other
    fields (event:, id:, comments) are ignored. A trailing \\r waits: it may be half of a \\r\\n."""
    cut = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
    text, keep = buf[:cut].replace(b"\r\n", b"\n").replace(b"\r", b"\n"), buf[cut:]
    *whole, rest = text.split(b"\n\n")
    out = []
    for ev in whole:
        data = [ln[5:][1:] if ln[5:6] == b" " else ln[5:] for ln in ev.split(b"\n") if ln.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))
    return out, rest + keep


async def _read_stream(c: Conn, out: Streamed, t_sched: float) -> None:
    head = await c.reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    out.status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    kind = headers.get("content-type", "")
    if out.status != 200 or not (kind.startswith("text/event-stream") or not kind and "transfer-encoding" in headers):
        return  # an unstreamed answer (a JSON body): EMPTY (stream_one)
    buf, last, events = b"", None, 0
    pieces = c.pieces(headers)
    while True:
        piece = await anext(pieces, None)
        if piece is None:  # the end: a \r held back is a line end
            done, buf = events_of(buf[:-1] + b"\n") if buf.endswith(b"\r") else ([], buf)
        else:
            done, buf = events_of(buf + piece)
        now = perf_counter()
        for data in done:
            if data.strip() == b"[DONE]":
                continue
            body = orjson.loads(data)
            if isinstance(body, dict) and body.get("error") is not None:  # failed after the 200: not an answer
                out.status = STREAM_ERROR
                return
            usage = body.get("usage") if isinstance(body, dict) else None
            if isinstance(usage, dict):
                out.tokens = int(usage.get("completion_tokens") or out.tokens)
            if _content(body):
                events += 1
                if last is None:
                    out.ttft = now - t_sched
                else:
                    out.gaps.append(now - last)
                last = now
                out.tokens = max(out.tokens, events)
        out.events = events
        if piece is None:
            return


async def stream_one(t: Target, raw: bytes, timeout: float, t_sched: float) -> Streamed:
    out, c = Streamed(lag=perf_counter() - t_sched), None
    try:
        async with asyncio.timeout(timeout):  # connecting included: a server that never accepts is a timeout
            c = await Conn.connect(t)
            c.writer.write(raw)
            await _read_stream(c, out, t_sched)
        if out.status == 200 and out.ttft is None:  # else counted nowhere: not ok, not an error
            out.status = EMPTY
    except TimeoutError:
        out.status = -1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, TypeError) as e:
        out.status = failed(e)
    finally:
        if c is not None:
            c.close()
    out.e2e = perf_counter() - t_sched
    return out


async def gen_level(t: Target, make: Callable[[], bytes], level: Level, duration: float, count: int,
                    timeout: float, seed: int) -> tuple[list[Streamed], float]:
    """Every request's record and the level's sending window in seconds (the duration, or until
    `count` were sent; not the wait for the last answers)."""
    results: list[Streamed] = []
    start = perf_counter()
    if level.kind == "closed":
        stop_at = end = start + duration

        async def client() -> None:
            while perf_counter() < stop_at and (not count or len(results) < count):
                results.append(Streamed())  # holds the count while in flight
                k, t0 = len(results) - 1, perf_counter()
                results[k] = await stream_one(t, make(), timeout, t0)
                results[k].at = t0 - start

        await asyncio.gather(*(client() for _ in range(int(level.value))))
        if count and len(results) >= count:  # as load.closed_loop: the count's last answer ends the window
            end = min(end, perf_counter())
    else:
        async def one(t_sched: float) -> Streamed:
            r = await stream_one(t, make(), timeout, t_sched)
            r.at = t_sched - start
            return r

        tasks, end = await poisson(level.value, duration, count, seed, start, one)
        results = list(await asyncio.gather(*tasks))
    return results, end - start


def tpot(r: Streamed) -> float | None:
    """r's seconds per output token after the first: its content's span over its tokens (usage's count), so a
    server that sends tokens in groups is timed per token, not per event; None under two tokens."""
    return sum(r.gaps) / (r.tokens - 1) if r.tokens > 1 and r.gaps else None


def gen_summary(level: Level, results: list[Streamed], span: float, ttft_budget_s: float,
                tpot_budget_s: float) -> dict[str, Any]:
    """span: the sending window (gen_level's); what arrived after it counts in totals, not in rates."""
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    asked = [r for r in results if r.status not in (429, CLIENT_LIMIT)]
    okay = np.array([r.status == 200 and r.ttft is not None for r in asked], dtype=bool)
    ttft = np.array([r.ttft or 0.0 for r in asked]) * 1e3
    e2e = np.array([r.e2e or 0.0 for r in asked]) * 1e3
    gaps = np.array([g for r in ok for g in r.gaps]) * 1e3
    per_token = np.array([x for r in ok if (x := tpot(r)) is not None and x > 0])  # seconds, per request
    good = [r for r in ok if r.ttft <= ttft_budget_s and ((x := tpot(r)) is None or x <= tpot_budget_s)]

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)), 2) if len(x) else None

    def in_window(r: Streamed) -> float:
        """r's output tokens that arrived within the window (usage tokens spread over its events)."""
        times = r.at + r.ttft + np.cumsum([0.0, *r.gaps])
        return r.tokens * float((times <= span).sum()) / len(times)

    tokens = sum(r.tokens for r in ok)
    events = sum(r.events for r in ok)
    drain = max((r.at + r.e2e for r in results if r.e2e is not None), default=span) - span
    tt, beyond = percentiles(ttft, okay, {"ttft_p50_ms": 50, "ttft_p90_ms": 90, "ttft_p99_ms": 99}, 2)
    ee, beyond_e = percentiles(e2e, okay, {"e2e_p50_ms": 50, "e2e_p99_ms": 99}, 2)
    span = max(span, 1e-9)
    row = {"load": level.name, "kind": level.kind, "value": level.value, "sent": len(results), "ok": len(ok),
           "rejected": sum(r.status == 429 for r in results), "shed": sum(r.status == 503 for r in results),
           "timeouts": sum(r.status == -1 for r in results),
           "errors": sum(r.status not in (200, 429, 503, -1, CLIENT_LIMIT) for r in results),
           "client_limit": sum(r.status == CLIENT_LIMIT for r in results),
           "empty_stream": sum(r.status == EMPTY for r in results),
           "stream_error": sum(r.status == STREAM_ERROR for r in results), "n": len(asked), **tt,
           "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
           "tpot_p50_ms": pct(per_token * 1e3, 50), "tpot_p99_ms": pct(per_token * 1e3, 99),
           "tokens_per_event": round(tokens / events, 3) if events else None, **ee,
           "beyond_timeout": beyond + beyond_e,
           "output_tokens": tokens, "output_tok_s": round(sum(in_window(r) for r in ok) / span, 2),
           "request_tok_s_p50": pct(1.0 / per_token, 50) if len(per_token) else None,
           "rps": round(sum(r.at + r.e2e <= span for r in ok) / span, 3),
           "offered_rps": round(len(results) / span, 3),
           "goodput": round(len(good) / len(results), 4) if results else None,
           "seconds": round(span, 2), "drain_s": round(max(drain, 0.0), 3),
           "p50_ms": tt["ttft_p50_ms"], "p99_ms": tt["ttft_p99_ms"]}  # p50/p99: TTFT (the plot's)
    return client_limit_warning(few_samples_warning(check_lag(row, [r.lag for r in results])))

"""The timed loops the serving benches alternate (serve_overhead.py, http_overhead.py, serve_vs_infinity.py):
`seconds` of one system at a time, one request after another, each request's time appended in ms."""
from __future__ import annotations

import time

STAGES = ("queue", "tokenize", "inference")  # the server's own x-millis-<stage>-ms headers


def inproc_round(model, texts: list[str], seconds: float, rng, out_ms: list[float]) -> None:
    """`model.run([text])` on random texts for `seconds`: the in-process side of an HTTP comparison."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        x = texts[rng.integers(len(texts))]
        t0 = time.perf_counter()
        model.run([x])
        out_ms.append((time.perf_counter() - t0) * 1e3)


async def http_round(conn, bodies: list[bytes], seconds: float, rng, out_ms: list[float],
                     stages: dict[str, list[float]] | None = None) -> None:
    """Random prepared requests through one keep-alive connection (millis.loadgen.client.Conn) for `seconds`;
    a non-200 answer raises. stages: each answer's server stage times (STAGES) appended too."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        raw = bodies[rng.integers(len(bodies))]
        t0 = time.perf_counter()
        status, headers, _ = await conn.send(raw)
        out_ms.append((time.perf_counter() - t0) * 1e3)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        if stages is not None:
            for s in STAGES:
                stages[s].append(float(headers[f"x-millis-{s}-ms"]))

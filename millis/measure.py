"""Stage 4: latency measurement, variants interleaved round by round.

Each (variant, shape) cell gets `warmup` untimed calls, then `iters` timed calls spread over
`rounds`; in every round the variant order rotates, so drift (thermal, neighbours) hits all alike.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from millis.config import MeasureConfig, Shape
from millis.runtimes import Runtime


def stats(samples_ms: list[float], batch: int) -> dict[str, float]:
    a = np.asarray(samples_ms)
    p50 = float(np.percentile(a, 50))
    return {"p50_ms": p50, "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": int(a.size), "rows_per_s": batch * 1000.0 / p50}


def measure(runtimes: dict[str, Runtime], inputs: dict[Shape, dict[str, np.ndarray]], cfg: MeasureConfig,
            on_round: Callable[[int], None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Return {variant: {shape_name: stats}} over interleaved rounds."""
    names = list(runtimes)
    samples: dict[tuple[str, Shape], list[float]] = {(n, s): [] for n in names for s in inputs}
    per_round = max(1, cfg.iters // cfg.rounds)
    for shape, feeds in inputs.items():  # warm-up: compile static shapes, fill caches
        for n in names:
            for _ in range(cfg.warmup):
                runtimes[n].run(feeds)
    for r in range(cfg.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for shape, feeds in inputs.items():
            for n in order:
                time.sleep(0.005)  # let the previous runtime's spinning worker threads park
                cell, budget = samples[(n, shape)], cfg.max_seconds_per_cell / cfg.rounds
                t_round = 0.0
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    runtimes[n].run(feeds)
                    dt = time.perf_counter() - t0
                    cell.append(dt * 1e3)
                    t_round += dt
                    if t_round > budget and len(cell) >= 3:  # a very slow cell: fewer calls, noted by n
                        break
        if on_round:
            on_round(r)
    return {n: {s.name: stats(samples[(n, s)], s.batch) for s in inputs} for n in names}


def cold_start(open_fn: Callable[[], Runtime], feeds: dict[str, np.ndarray]) -> tuple[Runtime, float, float]:
    """Open a runtime and make its first call; return (runtime, load_s, first_call_s)."""
    t0 = time.perf_counter()
    rt = open_fn()
    t1 = time.perf_counter()
    rt.run(feeds)
    return rt, t1 - t0, time.perf_counter() - t1


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as fh:
            import os
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

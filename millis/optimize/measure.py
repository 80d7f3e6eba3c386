"""Stage 4: latency measurement, variants interleaved round by round, then the serve mix.

Each (variant, shape) cell gets `warmup` untimed calls, then `iters` timed calls spread over
`rounds`; in every round the variant order rotates, so drift (thermal, neighbours) hits all alike.

The serve mix runs shapes no variant has seen, of the kind `millis serve` forms, each twice in a row:
cold (a runtime that compiles per shape stalls here), then warm; variants interleaved shape by shape.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable

import numpy as np

from millis.optimize.config import MeasureConfig
from millis.common.config import Shape
from millis.runtimes import Runtime
from millis.encoder.text import bucket_length

SERVE_MIX_SEED = 0


def stats(samples_ms: list[float], batch: int, round_p50s: list[float] | None = None) -> dict[str, Any]:
    """p50 / p95 / p99 / mean of the pooled samples; each round's own p50 and their spread (slowest over
    fastest, minus 1), so ratios can be taken round by round."""
    a = np.asarray(samples_ms)
    p50 = float(np.percentile(a, 50))
    rounds = [round(x, 4) for x in round_p50s or []]
    spread = max(rounds) / min(rounds) - 1 if rounds and min(rounds) > 0 else 0.0
    return {"p50_ms": p50, "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": int(a.size), "rows_per_s": batch * 1000.0 / p50,
            "round_p50_ms": rounds, "spread": round(spread, 4),
            "cdf_ms": [round(float(x), 4) for x in np.percentile(a, np.arange(0, 101, 5))]}


def paired_ratio(ref_rounds: list[float], rounds: list[float]) -> tuple[float, float, float] | None:
    """(median, min, max) over rounds of ref p50 / this p50: the speed-up from interleaved pairs (a load
    that hits one round hits both sides of its pair)."""
    pairs = [r / x for r, x in zip(ref_rounds, rounds) if x > 0]
    return (float(np.median(pairs)), min(pairs), max(pairs)) if pairs else None


def ran(runtimes: dict[str, Runtime], n: str, shape: Shape, feeds: dict[str, np.ndarray], failed: dict[str, str]) -> bool:
    """One call of variant n; False, its reason in `failed`, when it raises (a shape its kernels refuse, memory):
    that variant is measured no more, the others go on."""
    try:
        runtimes[n].run(feeds)
        return True
    except Exception as e:  # noqa: BLE001 -- one variant's failure, not the run's
        failed[n] = f"measurement failed at {shape.name}: {type(e).__name__}: {e}"
        return False


def measure(runtimes: dict[str, Runtime], inputs: dict[Shape, dict[str, np.ndarray]], cfg: MeasureConfig,
            on_round: Callable[[int], None] | None = None,
            failed: dict[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Return {variant: {shape_name: stats}} over interleaved rounds; a variant that raised is left out, its reason
    in `failed`."""
    names, failed = list(runtimes), {} if failed is None else failed
    samples: dict[tuple[str, Shape], list[float]] = {(n, s): [] for n in names for s in inputs}
    by_round: dict[tuple[str, Shape], list[float]] = {(n, s): [] for n in names for s in inputs}
    for shape, feeds in inputs.items():  # warm-up: fill caches, grow memory arenas
        for n in names:
            for _ in range(cfg.warmup):
                if n in failed or not ran(runtimes, n, shape, feeds, failed):
                    break
    shuffle = random.Random(0)  # a seeded random order each round: a rotation made each variant always follow the
    for r in range(cfg.rounds):  # same one, whose spinning worker threads then always landed on it
        order = shuffle.sample(names, len(names))
        for shape, feeds in inputs.items():
            for n in (n for n in order if n not in failed):
                time.sleep(0.005)  # let the previous runtime's spinning worker threads park
                cell, budget = samples[(n, shape)], cfg.max_seconds_per_cell / cfg.rounds
                t_round, first = 0.0, len(cell)
                # --iters split over the rounds, the remainder in the first ones (9 over 5: 2, 2, 2, 2, 1)
                for _ in range(max(1, cfg.iters // cfg.rounds + (r < cfg.iters % cfg.rounds))):
                    t0 = time.perf_counter()
                    if not ran(runtimes, n, shape, feeds, failed):
                        break
                    dt = time.perf_counter() - t0
                    cell.append(dt * 1e3)
                    t_round += dt
                    if t_round > budget and len(cell) - first >= 3:  # a very slow cell: fewer calls (3 a round)
                        break
                if n not in failed:
                    by_round[(n, shape)].append(float(np.median(cell[first:])))
        if on_round:
            on_round(r)
    return {n: {s.name: stats(samples[(n, s)], s.batch, by_round[(n, s)]) for s in inputs} for n in names
            if n not in failed}


def serve_mix_shapes(cfg: MeasureConfig, token_counts: list[int], max_length: int,
                     exclude: tuple[Shape, ...] = ()) -> list[Shape]:
    """`cfg.serve_mix` distinct (B, T) shapes such as `millis serve` forms for texts of `token_counts`
    tokens, seeded. T is the 16-token bucket of a text drawn at random, so each bucket comes as often
    as these texts fill it; B is drawn from the i-th of `serve_mix` equal slices of 1..serve_max_batch,
    so batches from 1 row to full ones all occur; B x T stays <= serve_max_tokens (the server caps rows
    x bucket too). None of `exclude` (the shapes `measure` warmed); returned in shuffled order."""
    buckets = [bucket_length(n, max_length) for n in token_counts]
    n, top = cfg.serve_mix, cfg.serve_max_batch
    if n <= 0 or not buckets:
        return []
    rng = random.Random(SERVE_MIX_SEED)
    out: list[Shape] = []
    for _ in range(50 * n):  # draws that land on a taken or excluded shape are drawn again
        if len(out) == n:
            break
        i = len(out)
        lo = min(top, 1 + i * top // n)
        t = rng.choice(buckets)
        b = min(rng.randint(lo, max(lo, (i + 1) * top // n)), max(1, cfg.serve_max_tokens // t))
        if Shape(b, t) not in exclude and Shape(b, t) not in out:
            out.append(Shape(b, t))
    rng.shuffle(out)
    return out


def is_stall(cold_s: float, warm_s: float, cfg: MeasureConfig) -> bool:
    """A first call at a shape that costs far more than the next call at it (a compile, not noise)."""
    return cold_s > cfg.stall_ratio * warm_s and cold_s - warm_s > cfg.stall_s


def serve_mix(runtimes: dict[str, Runtime], inputs: dict[Shape, dict[str, np.ndarray]],
              cfg: MeasureConfig, failed: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every shape of `inputs` (shapes no runtime has seen) twice in a row per variant: cold, then warm.
    Shape by shape, the variant order rotating, so a neighbour's load hits all variants alike, and the
    adjacent cold and warm calls alike. Returns per variant rows/s over its whole sequence, the worst
    call and the shapes that stalled (millis.optimize.select.serve_gate judges them); a variant that raised is
    left out, its reason in `failed`."""
    names, failed = list(runtimes), {} if failed is None else failed
    cold: dict[str, dict[Shape, float]] = {n: {} for n in names}
    warm: dict[str, dict[Shape, float]] = {n: {} for n in names}
    for i, (s, feeds) in enumerate(inputs.items()):
        for n in names[i % len(names):] + names[:i % len(names)]:
            time.sleep(0.005)  # let the previous runtime's spinning worker threads park
            for calls in (cold[n], warm[n]):
                t0 = time.perf_counter()
                if n in failed or not ran(runtimes, n, s, feeds, failed):
                    break
                calls[s] = time.perf_counter() - t0
    rows = 2 * sum(s.batch for s in inputs)
    out = {}
    for n in (n for n in names if n not in failed):
        c, w = cold[n], warm[n]
        worst = max(inputs, key=lambda s: max(c[s], w[s]))
        stalls = sorted(({"shape": s.name, "cold_ms": 1e3 * c[s], "warm_ms": 1e3 * w[s]}
                         for s in inputs if is_stall(c[s], w[s], cfg)),
                        key=lambda x: x["warm_ms"] - x["cold_ms"])  # the largest stall first
        out[n] = {"shapes": [s.name for s in inputs], "calls": 2 * len(inputs),
                  "rows_per_s": rows / (sum(c.values()) + sum(w.values())),
                  "worst_ms": 1e3 * max(c[worst], w[worst]), "worst_shape": worst.name,
                  "worst_warm_ms": 1e3 * w[worst], "stalls": stalls}
    return out


def cold_start(open_fn: Callable[[], Runtime], feeds: dict[str, np.ndarray]) -> tuple[Runtime, float, float]:
    """Open a runtime and make its first call; return (runtime, load_s, first_call_s)."""
    t0 = time.perf_counter()
    rt = open_fn()
    t1 = time.perf_counter()
    rt.run(feeds)
    return rt, t1 - t0, time.perf_counter() - t1


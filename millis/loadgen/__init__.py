"""`millis bench URL`: load levels against a running server; a table, JSON and latency_vs_load.png.

Encoder servers get embed / classify requests; generation servers (a `generate` model card, or a
--route ending in completions) get streamed chat or text completions timed token by token
(`streams.py`): each text of --data is a user question, after the --system file's text when given
(a shared prefix, as a product's system prompt)."""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from time import perf_counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import orjson

from millis.common.config import flag as _f
from millis.common.errors import MillisError
from millis.common.readers import read_texts
from millis.loadgen.client import Conn, Target, fetch
from millis.common.files import raise_fd_limit
from millis import __version__
from millis.common.hardware import describe, source_revision
from millis.loadgen.load import (Level, client_cpu, parse_levels, probe_ms, quiet_limit_ms, run_level, settle,
                                 settle_note, warm)
from millis.loadgen.streams import gen_level, gen_summary, stream_one


@dataclass(frozen=True)
class BenchConfig:
    url: str = _f("", "server base URL, e.g. http://127.0.0.1:8000")
    data: str = _f("", "texts to send (required): .txt (one per line) or CSV/TSV/JSONL with --text-col; sampled with "
                       "--seed", scoped=True)
    text_col: str = _f("text", "text column of --data")
    concurrency: str = _f("1,4,16", "closed-loop levels: clients sending back to back, comma-separated")
    rate: str = _f("", "open-loop levels: Poisson arrivals per second, comma-separated")
    duration: float = _f(30.0, "seconds per level")
    count: int = _f(0, "at most this many requests per level (0 = duration only)")
    inputs: int = _f(1, "texts per request")
    route: str = _f("", "path to post to (default: from GET /v1/models: /v1/embeddings or /v1/classify)")
    model: str = _f("", "the 'model' field sent (default: the first id of GET /v1/models)", scoped=True)
    timeout: float = _f(30.0, "seconds a request may take before it counts as timed out")
    warmup: int = _f(50, "unrecorded requests before the first level", scoped=True)
    seed: int = _f(0, "seed for text sampling and Poisson arrivals")
    max_tokens: int = _f(64, "generation: max_tokens of each request (greedy)", scoped=True)  # not serve's default
    system: str = _f("", "generation: a text file sent as the system message of every request (a shared prefix)")
    ttft_budget_ms: float = _f(1000.0, "generation goodput: time to first token within this")
    itl_budget_ms: float = _f(100.0, "generation goodput: each request's time per output token after the first "
                                     "(TPOT) within this")
    out: str = _f("bench-results", "directory for bench.json and latency_vs_load.png")


async def discover(t: Target, route: str, model: str, timeout: float) -> tuple[str, str]:
    """Route and model name from GET /v1/models when not given (millis and OpenAI-style servers)."""
    if route and model:
        return route, model
    try:
        status, body = await fetch(t, "GET", "/v1/models", timeout=timeout)
    except OSError as e:
        raise MillisError(f"cannot reach {t.url}: {e}") from None
    try:
        card = orjson.loads(body)["data"][0] if status == 200 else {}
        if not isinstance(card, dict):
            raise TypeError("a model card is a JSON object")
    except (ValueError, KeyError, IndexError, TypeError) as e:  # not JSON, no data, an empty list
        need = " and ".join(f for f, given in (("--route", route), ("--model", model)) if not given)
        raise MillisError(f"GET {t.url}/v1/models answered 200 without a model card ({type(e).__name__}: {e}); "
                          f"give {need}") from None
    route = route or {"classify": "/v1/classify", "generate": "/v1/chat/completions"}.get(card.get("task"),
                                                                                         "/v1/embeddings")
    return route, model or card.get("id", "")


async def first_answer(t: Target, make: Callable[[], bytes], timeout: float) -> None:
    """One request before any level: a route or body the server refuses (a 4xx but 408 / 429) is said with its
    answer, not counted in every level (a route the server lacks read 13,190 errors and exited 0)."""
    c = await asyncio.wait_for(Conn.connect(t), timeout)
    try:
        status, _, data = await asyncio.wait_for(c.send(make()), timeout)
    finally:
        c.close()
    if 400 <= status < 500 and status not in (408, 429):
        raise MillisError(f"{t.url}: the first request was answered {status}: "
                          f"{data[:300].decode('utf-8', 'replace')}")


def request_maker(t: Target, route: str, model: str, texts: list[str], inputs: int, seed: int,
                  cfg: BenchConfig | None = None) -> Callable[[], bytes]:
    rng = random.Random(seed)
    key = "inputs" if route.endswith("classify") else "input"
    system = Path(cfg.system).read_text() if cfg is not None and cfg.system else ""

    def make() -> bytes:
        body: dict[str, Any] = {key: rng.choices(texts, k=inputs)}
        if route.endswith("completions"):  # greedy, streamed, usage in the last event
            q = rng.choice(texts)
            body = {"max_tokens": cfg.max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if route.endswith("chat/completions"):
                body["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                    [{"role": "user", "content": q}]
            else:
                body["prompt"] = system + q
        if model:
            body["model"] = model
        return t.request_bytes("POST", route, orjson.dumps(body))
    return make


async def run_levels(t: Target, make: Callable[[], bytes], levels: list[Level], duration: float, count: int,
                     timeout: float, seed: int, on_row: Callable[[dict], None] | None = None,
                     idle_ms: float = 0.0) -> list[dict]:
    """Each level in turn; before each after the first, the server is settled: probed until a request is answered
    about as fast as when idle (idle_ms, warm's; 0: not settled), so one level's backlog is not the next's."""
    async def probe() -> float:
        return (await probe_ms(t, make, 1, timeout))[0]

    rows: list[dict] = []
    for k, lv in enumerate(levels):
        waited = await settle(probe, quiet_limit_ms(idle_ms)) if k and idle_ms > 0 else (0.0, True)
        rows.append(settle_note(await run_level(t, make, lv, duration, count, timeout, seed + k), *waited))
        if on_row:
            on_row(rows[-1])
    return rows


async def gen_levels(t: Target, make: Callable[[], bytes], levels: list[Level], cfg: BenchConfig,
                     on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Streamed generation levels (a few unrecorded requests first: --warmup, at most 3), each after the first
    once the server is settled (a request's time to first token about the warm-up's)."""
    async def ttft_ms() -> float:
        r = await stream_one(t, make(), cfg.timeout, perf_counter())
        return r.ttft * 1e3 if r.status == 200 and r.ttft is not None else cfg.timeout * 1e3

    idle = [await ttft_ms() for _ in range(min(cfg.warmup, 3))]
    rows: list[dict] = []
    for k, lv in enumerate(levels):
        waited = await settle(ttft_ms, quiet_limit_ms(min(idle))) if k and idle else (0.0, True)
        cpu0, wall0 = time.process_time(), perf_counter()
        results, span = await gen_level(t, make, lv, cfg.duration, cfg.count, cfg.timeout, cfg.seed + k)
        row = gen_summary(lv, results, span, cfg.ttft_budget_ms / 1e3, cfg.itl_budget_ms / 1e3)
        rows.append(settle_note(client_cpu(row, time.process_time() - cpu0, perf_counter() - wall0), *waited))
        if on_row:
            on_row(rows[-1])
    return rows


def bench(cfg: BenchConfig, on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every level against cfg.url; write bench.json and latency_vs_load.png under cfg.out."""
    if not cfg.url:
        raise MillisError("millis bench needs a URL")
    if not cfg.data:
        raise MillisError("millis bench needs --data (a file of texts)")
    if cfg.inputs < 1 or cfg.duration <= 0:
        raise MillisError("--inputs must be >= 1 and --duration > 0")
    if cfg.timeout <= 0 or cfg.count < 0:
        raise MillisError(f"--timeout must be > 0 and --count >= 0, got {cfg.timeout:g} / {cfg.count}")
    t, texts = Target(cfg.url), read_texts(cfg.data, cfg.text_col)
    levels = parse_levels(cfg.concurrency, cfg.rate)
    raise_fd_limit()

    async def go() -> tuple[str, str, list[dict]]:
        route, model = await discover(t, cfg.route, cfg.model, cfg.timeout)
        make = request_maker(t, route, model, texts, cfg.inputs, cfg.seed, cfg)
        await first_answer(t, make, cfg.timeout)
        if route.endswith("completions"):
            return route, model, await gen_levels(t, make, levels, cfg, on_row)
        idle_ms = await warm(t, make, cfg.warmup, cfg.timeout)
        return route, model, await run_levels(t, make, levels, cfg.duration, cfg.count, cfg.timeout, cfg.seed, on_row,
                                              idle_ms)

    load_before = os.getloadavg()
    try:
        route, model, rows = asyncio.run(go())
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:  # setup and warm-up
        raise MillisError(f"{t.url}: {type(e).__name__}: {e}") from None
    result = {"url": t.url, "route": route, "model": model, "config": asdict(cfg),
              "host": {**describe(), "millis": __version__, "revision": source_revision(),
                       "loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot({t.url: rows}, out / "latency_vs_load.png")
    return result


def plot(series: dict[str, list[dict]], path: Path) -> None:
    """p50 and p99 against achieved throughput, one line pair per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # closed-loop latency is service time (coordinated omission), open-loop what users see: never one line
    lines = {f"{name} {kind}" if len({r["kind"] for r in rows}) > 1 else name: [r for r in rows if r["kind"] == kind]
             for name, rows in series.items() for kind in ("closed", "open") if any(r["kind"] == kind for r in rows)}
    for k, (name, rows) in enumerate(lines.items()):
        rows = sorted((r for r in rows if r["p50_ms"] is not None), key=lambda r: r["rps"])
        color = f"C{k}"
        x = [r["rps"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
        # a p99 past the timeout is no number (None): a gap in the line, not a point
        ax.plot(x, [r["p99_ms"] if r["p99_ms"] is not None else float("nan") for r in rows], "s--", color=color,
                label=f"{name} p99")
        for r in rows:
            y = r["p99_ms"] if r["p99_ms"] is not None else r["p50_ms"]
            ax.annotate(r["load"], (r["rps"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("throughput (2xx answered within the sending window, per s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("latency vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

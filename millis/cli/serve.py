"""`millis serve` (an artifact or a decoder over HTTP) and `millis bench` (load-test a running server).

Every field of ServeConfig / BenchConfig is a flag and a MILLIS_* variable, so a container sets the
server up with variables alone.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from millis.cli.flags import Command, Given

if TYPE_CHECKING:
    from millis.loadgen import BenchConfig
    from millis.serve.config import ServeConfig
    from millis.serve.ray.config import RayConfig


def serve_groups() -> tuple[type, ...]:
    from millis.serve.config import ServeConfig
    from millis.serve.ray.config import RayConfig

    return (ServeConfig, RayConfig)


def serve_config(given: Given) -> tuple[ServeConfig, RayConfig]:
    from millis.serve.config import ServeConfig
    from millis.serve.ray.config import RayConfig

    return given.build(ServeConfig), given.build(RayConfig)


def serve(cfgs: tuple[ServeConfig, RayConfig]) -> int:
    cfg, ray = cfgs
    if ray.wanted:  # replicas on Ray Serve (Ray is imported only here)
        from millis.serve.ray.deploy import serve_on_ray

        return serve_on_ray(cfg, ray)
    from millis.serve import serve

    return serve(cfg)


def bench_groups() -> tuple[type, ...]:
    from millis.loadgen import BenchConfig

    return (BenchConfig,)


def bench_config(given: Given) -> BenchConfig:
    from millis.loadgen import BenchConfig

    return given.build(BenchConfig)


def bench(cfg: BenchConfig) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from millis.loadgen import bench

    console = Console() if sys.stdout.isatty() else Console(width=200)  # a pipe's 80 columns cut the table to "2…"
    console.print(f"[bold]millis bench[/] {cfg.url}: {cfg.duration:g} s per level")

    def ms(r: dict, key: str) -> str:
        # a percentile that lands on a request not answered within the timeout is a bound, not a latency
        return ">=timeout" if key in r.get("beyond_timeout", ()) else str(r[key])

    def row(r: dict) -> None:
        if "ttft_p50_ms" in r:  # generation
            console.print(f"  {r['load']:>8}: {r['rps']:6.2f} req/s  TTFT p50 {ms(r, 'ttft_p50_ms')} "
                          f"p99 {ms(r, 'ttft_p99_ms')} ms  TPOT p50 {r['tpot_p50_ms']} p99 {r['tpot_p99_ms']} ms  "
                          f"ITL p50 {r['itl_p50_ms']} p99 {r['itl_p99_ms']} ms ({r['tokens_per_event']} tok/event)  "
                          f"{r['output_tok_s']} tok/s  goodput {r['goodput']}  ok {r['ok']}  429 {r['rejected']}  "
                          f"503 {r['shed']}  errors {r['errors']} (empty {r['empty_stream']}, "
                          f"in-stream {r['stream_error']})  "
                          f"timeouts {r['timeouts']}  drain {r['drain_s']} s  send lag p99 {r['send_lag_p99_ms']} ms",
                          highlight=False, markup=False)
        else:
            console.print(f"  {r['load']:>8}: {r['rps']:8.1f} req/s  p50 {ms(r, 'p50_ms')} ms  p99 {ms(r, 'p99_ms')} "
                          f"ms  ok {r['ok']}  429 {r['rejected']}  503 {r['shed']}  errors {r['errors']}  "
                          f"timeouts {r['timeouts']}", highlight=False, markup=False)
        for w in r["warnings"]:
            console.print(f"  [yellow]{r['load']}: {escape(w)}[/]")

    res = bench(cfg, on_row=row)
    if res["rows"] and "ttft_p50_ms" in res["rows"][0]:
        console.print(f"wrote {Path(cfg.out) / 'bench.json'} and latency_vs_load.png (TTFT)")
        return 0
    t = Table(title=escape(f"{res['url']}{res['route']} ({res['model']})"))  # a model id may hold [/x]
    for c in ("load", "req/s", "offered/s", "p50 ms", "p90 ms", "p99 ms", "ok", "429", "503", "errors", "timeouts",
              "drain s", "send lag p99 ms"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        lag = f"{r['send_lag_p99_ms']}" + (" (!)" if r["warnings"] else "")
        t.add_row(r["load"], f"{r['rps']:.1f}", f"{r['offered_rps']:.1f}",
                  *(ms(r, k) for k in ("p50_ms", "p90_ms", "p99_ms")),
                  *(str(r[k]) for k in ("ok", "rejected", "shed", "errors", "timeouts", "drain_s")), lag)
    console.print(t)
    console.print("req/s: 2xx answered within each level's sending window; >=timeout: the percentile lands on a "
                  "request not answered in time (timed out, failed or shed)"
                  + ("; (!): the client sent late, see the warnings above" if any(r["warnings"] for r in res["rows"])
                     else ""), highlight=False, markup=False)
    console.print(f"wrote {Path(cfg.out) / 'bench.json'} and latency_vs_load.png")
    return 0


SERVE = Command("serve", "serve an artifact (dynamic batching) or a decoder (OpenAI completions / chat) over HTTP; "
                         "every flag also MILLIS_*", serve_groups, serve_config, serve, positionals=("artifact",))
BENCH = Command("bench", "load-test a running server: closed and open loop, p50/p90/p99, 429s and 503s",
                bench_groups, bench_config, bench, positionals=("url",))

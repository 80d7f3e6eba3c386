"""`millis serve` against the Infinity embedding server, one after the other, same loads, same client.

Model: the real all-MiniLM-L6-v2. millis serves its optimized artifact (the cosine >= 0.995 recipe of
bench/accuracy.py, built if missing); Infinity (`infinity-emb`, its own venv from
bench/peers/setup.sh infinity) serves the same weights from the same local directory on CPU with its
default torch engine. Texts: Banking77 test, one per request, to /v1/embeddings.

Loads, per system: closed loop at concurrency 1, 4, 16; Poisson at 50% and 90% of millis's measured
capacity (its best closed-loop req/s), and at 2x that capacity (overload: every request must be
answered, 2xx or 429). At concurrency 1, millis is interleaved with the same artifact called in this
process (`millis.load(...).run([text])`), so the HTTP overhead is read against a baseline measured in
the same minutes. Writes bench/results/serve_vs_infinity.json and bench/results/latency_vs_load.png.

    bash bench/peers/setup.sh infinity && .venv/bin/python bench/serve_vs_infinity.py
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from millis.common.readers import read_column  # noqa: E402
from millis.loadgen import plot, request_maker  # noqa: E402
from millis.loadgen.client import Conn, Target  # noqa: E402
from millis.loadgen.load import Level, Recorder, run_level, summarize, warm  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402
from request_rounds import inproc_round  # noqa: E402

RESULTS = HERE / "results"
INFINITY = HERE / ".venvs" / "infinity"
ARTIFACT = HERE / ".cache" / "artifacts" / "minilm-embed"


def data_root() -> Path:
    return Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")


def start_infinity(model_dir: Path, port: int) -> ServerProcess:
    env = dict(HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    return ServerProcess([str(INFINITY / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir),
                          "--served-model-name", "minilm", "--engine", "torch", "--device", "cpu",
                          "--port", str(port), "--url-prefix", "/v1", "--log-level", "warning"],
                         port=port, ready_path="/health", env=env, ready_timeout=300)


async def interleaved_c1(t: Target, make, model, texts: list[str], rounds: int, seconds: float, timeout: float):
    """Alternate `seconds` of in-process calls and of concurrency-1 HTTP, `rounds` times."""
    rng = np.random.default_rng(0)
    inproc: list[float] = []
    rec = Recorder()
    conn = await Conn.connect(t)
    rec.t_first = time.perf_counter()
    http_time = 0.0
    for _ in range(rounds):
        inproc_round(model, texts, seconds, rng, inproc)  # ms
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            status, _, _ = await asyncio.wait_for(conn.send(make()), timeout)
            rec.add(time.perf_counter() - t0, status, time.perf_counter())
        http_time += time.perf_counter() - start
    conn.close()
    rec.t_first, rec.t_last = 0.0, http_time   # throughput over the HTTP blocks only
    return summarize(Level("closed", 1, "c1"), rec), inproc


async def run_system(url: str, texts: list[str], levels: list[Level], duration: float, timeout: float,
                     model=None, rounds: int = 6) -> tuple[list[dict], dict]:
    t = Target(url)
    make = request_maker(t, "/v1/embeddings", "minilm", texts, 1, seed=0)
    await warm(t, make, 200, timeout)
    rows, extra = [], {}
    for lv in levels:
        if lv.name == "c1" and model is not None:
            row, inproc = await interleaved_c1(t, make, model, texts, rounds, duration / rounds * 2, timeout)
            extra["in_process"] = {"p50_ms": round(float(np.percentile(inproc, 50)), 3),
                                   "p99_ms": round(float(np.percentile(inproc, 99)), 3), "calls": len(inproc)}
        else:
            # the seed follows the level, not its position: both systems get the same arrival times
            row = await run_level(t, make, lv, duration, 0, timeout, seed=zlib.crc32(lv.name.encode()))
        rows.append(row)
        print(f"    {lv.name:>10}: {row['rps']:8.1f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
              f"ok {row['ok']}  429 {row['rejected']}  errors {row['errors']}  timeouts {row['timeouts']}", flush=True)
    return rows, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load level")
    ap.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    ap.add_argument("--port", type=int, default=8790, help="Infinity's port (millis serve takes a free one)")
    ap.add_argument("--out", default=str(RESULTS / "serve_vs_infinity.json"))
    ap.add_argument("--millis-only", action="store_true", help="skip Infinity (a quick look; no comparison)")
    a = ap.parse_args()

    import millis
    from millis.encoder.source import builtin_minilm_dir

    if not (INFINITY / ".millis-ok").exists():
        print("Infinity venv missing: run `bash bench/peers/setup.sh infinity` first", file=sys.stderr)
        return 2
    if not (ARTIFACT / "millis.json").exists():
        import accuracy  # bench/accuracy.py: the same MiniLM recipe at cosine >= 0.995

        accuracy.embed_recovery(iters=200, min_cosine=0.995)
    texts = read_column(data_root() / "banking77" / "test.csv", "text")
    closed = [Level("closed", c, f"c{c}") for c in (1, 4, 16)]

    print(f"millis serve {ARTIFACT.name} ({json.loads((ARTIFACT / 'millis.json').read_text())['variant']['name']})",
          flush=True)
    srv = ServerProcess(serve_command(ARTIFACT, "--model-name", "minilm"), ready_timeout=180)
    url, ready_s = srv.url, srv.ready_s
    model = millis.load(ARTIFACT)                    # the in-process baseline, same artifact
    m_rows, extra = asyncio.run(run_system(url, texts, closed, a.duration, a.timeout, model))
    del model
    capacity = max(r["rps"] for r in m_rows)
    open_levels = [Level("open", capacity * f, name) for f, name in ((0.5, "poisson50"), (0.9, "poisson90"),
                                                                        (2.0, "overload2x"))]
    m_rows += asyncio.run(run_system(url, texts, open_levels, a.duration, a.timeout))[0]
    millis_exit = srv.stop()
    if a.millis_only:
        for r in m_rows:
            print(r)
        print("in-process", extra["in_process"], "sigterm exit", millis_exit)
        return 0

    print(f"infinity-emb (torch, cpu), same loads; millis capacity {capacity:.0f} req/s", flush=True)
    srv = start_infinity(builtin_minilm_dir(), a.port)
    inf_ready_s = srv.ready_s
    i_rows = asyncio.run(run_system(srv.url, texts, closed + open_levels, a.duration, a.timeout))[0]
    srv.stop()

    rows = [dict(system="millis", **r) for r in m_rows] + [dict(system="infinity", **r) for r in i_rows]
    inf = {r["load"]: r for r in i_rows}
    checks = {"c1_p50_overhead_ms": round(m_rows[0]["p50_ms"] - extra["in_process"]["p50_ms"], 3)}
    for r in m_rows:
        o = inf[r["load"]]
        checks[r["load"]] = {"p99_ratio": round(r["p99_ms"] / o["p99_ms"], 3) if o["p99_ms"] else None,
                             "rps_ratio": round(r["rps"] / o["rps"], 3) if o["rps"] else None}
    over = next(r for r in m_rows if r["load"] == "overload2x")
    result = {"bench": "serve_vs_infinity", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "model": "all-MiniLM-L6-v2", "millis_variant": json.loads((ARTIFACT / "millis.json").read_text())
              ["variant"]["name"], "infinity": {"version": "0.0.78", "engine": "torch", "device": "cpu"},
              "texts": "banking77 test, 1 per request", "duration_s": a.duration, "timeout_s": a.timeout,
              "capacity_rps": capacity, "in_process": extra["in_process"],
              "millis_ready_s": round(ready_s, 2), "infinity_ready_s": round(inf_ready_s, 2),
              "millis_sigterm_exit": millis_exit,
              "overload2x": {"answered_share": over["answered_share"], "admitted_p99_ms": over["p99_ms"],
                             "rejected": over["rejected"], "sent": over["sent"]},
              "checks": checks, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    plot({"millis": m_rows, "infinity": i_rows}, Path(a.out).with_name("latency_vs_load.png"))

    print(f"\n{'system':>9} {'load':>10} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'429':>6}")
    for r in rows:
        print(f"{r['system']:>9} {r['load']:>10} {r['rps']:>9.1f} {r['p50_ms']!s:>9} {r['p99_ms']!s:>9} "
              f"{r['errors'] + r['timeouts']:>7} {r['rejected']:>6}")
    print(f"\nin-process p50 {extra['in_process']['p50_ms']} ms; millis c1 p50 overhead "
          f"{checks['c1_p50_overhead_ms']} ms (target <= 0.5)")
    for load, c in checks.items():
        if isinstance(c, dict):
            print(f"  {load:>10}: p99 ratio {c['p99_ratio']} (target <= 0.7), req/s ratio {c['rps_ratio']} (>= 1.3)")
    print(f"overload 2x: answered {over['answered_share']:.2%}, admitted p99 {over['p99_ms']} ms; "
          f"SIGTERM exit {millis_exit}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`millis serve` against the Infinity embedding server, both up at once, alternated level by level and round by
round, same loads, same client.

Model: the real all-MiniLM-L6-v2. millis serves its optimized artifact (the cosine >= 0.995 recipe of
bench/accuracy.py, built if missing); Infinity (`infinity-emb`, its own venv from
bench/peers/setup.sh infinity) serves the same weights from the same local directory on CPU with its
default torch engine. Texts: Banking77 test, one per request, to /v1/embeddings.

Loads: closed loop at concurrency 1, 4, 16; then Poisson at 50% and 90% of each system's own capacity (its best
closed-loop req/s) and at 2x it (overload: every request must be answered, 2xx or 429): poisson50, poisson90,
overload2x; and Poisson at the same absolute rate for both, 50%, 90% and 200% of the lower of the two
capacities: equal50, equal90, equal2x (the same arrival times for both). Each level runs --rounds rounds; in each
round each system gets --duration / --rounds seconds, the two in turn, the first of the pair alternating round by
round (the other server idles meanwhile; after an open-loop turn the system is probed until it answers about as
fast as when idle, so no backlog of requests the client gave up on runs into the other's turn). A row per system
and level pools its rounds; `checks` hold, per level,
millis / Infinity of the pooled p99 and req/s and the median of the per-round ratios with their range. Latency
percentiles: p50_ms / p99_ms as millis.loadgen.load.summarize gives them (over every request not refused with
429), and all_p50_ms / all_p99_ms over every request sent (millis.loadgen.load.percentiles: a request not
answered 2xx, 429 included, ranks above the timeout; a percentile landing there is null, its key in
all_beyond_timeout): the ratios use the latter, so a server's refusals are not left out of its tail. At
concurrency 1, each millis turn is preceded by the same seconds of the same artifact called in this process
(`millis.load(...).run([text])`): the HTTP overhead, read round by round. The machine (CPU, ISA) is recorded.
Writes bench/results/serve_vs_infinity.json and bench/results/latency_vs_load.png.

    bash bench/peers/setup.sh infinity && .venv/bin/python bench/serve_vs_infinity.py

Figures committed before 2026-12-05 came from the earlier script: all millis levels, then all Infinity's, Poisson
rates from millis's capacity only, and millis's p99 at overload without its 429s (Infinity's with every request).
"""
from __future__ import annotations

import asyncio
import argparse
import json
import os
import platform
import statistics
import subprocess
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
from millis.loadgen.client import Target  # noqa: E402
from millis.loadgen.load import (Level, Recorder, closed_loop, open_loop, percentiles, probe_ms,  # noqa: E402
                                 quiet_limit_ms, settle, summarize, warm)
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402
from request_rounds import inproc_round  # noqa: E402

RESULTS = HERE / "results"
INFINITY = HERE / ".venvs" / "infinity"
ARTIFACT = HERE / ".cache" / "artifacts" / "minilm-embed"
CLOSED = (1, 4, 16)
OWN = ((0.5, "poisson50"), (0.9, "poisson90"), (2.0, "overload2x"))  # of each system's own capacity
EQUAL = ((0.5, "equal50"), (0.9, "equal90"), (2.0, "equal2x"))       # of the lower capacity, for both
EVERY = {"all_p50_ms": 50, "all_p90_ms": 90, "all_p99_ms": 99}


def data_root() -> Path:
    return Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")


def start_infinity(model_dir: Path, port: int) -> ServerProcess:
    env = dict(HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    return ServerProcess([str(INFINITY / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir),
                          "--served-model-name", "minilm", "--engine", "torch", "--device", "cpu",
                          "--port", str(port), "--url-prefix", "/v1", "--log-level", "warning"],
                         port=port, ready_path="/health", env=env, ready_timeout=300)


def infinity_version() -> str | None:
    try:
        return subprocess.run([str(INFINITY / "bin" / "python"), "-c", "from importlib.metadata import version; "
                               "print(version('infinity-emb'))"], capture_output=True, text=True,
                              timeout=60).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def every_request(rec: Recorder) -> dict:
    """Percentiles over every request sent: a request not answered 2xx (429, 503, an error, a timeout) ranks above
    the timeout (null where a percentile lands on one, its key in all_beyond_timeout)."""
    st = np.asarray(rec.status)
    pcts, beyond = percentiles(np.asarray(rec.lat) * 1e3, (st >= 200) & (st < 300), EVERY, 3)
    return {**pcts, "all_beyond_timeout": beyond}


def pool(level: Level, recs: list[Recorder]) -> dict:
    """One row over every round's requests: summarize's counts and percentiles over them all, throughput as the
    2xx answered within each round's own sending window over the windows' total, and every_request's
    percentiles."""
    merged = Recorder()
    for r in recs:
        merged.lat += r.lat
        merged.status += r.status
        merged.done += r.done
        merged.lag += r.lag
    row = summarize(level, merged)  # its throughput fields (merged windows) are replaced below
    window = sum(max(r.t_end - r.t_first, 1e-9) for r in recs)
    served = sum(sum(200 <= s < 300 and d <= r.t_end for s, d in zip(r.status, r.done)) for r in recs)
    row.update(rps=round(served / window, 1), offered_rps=round(len(merged.status) / window, 1),
               window_s=round(window, 3), drain_s=round(max(max(r.t_last - r.t_end, 0.0) for r in recs), 3),
               rounds=len(recs), **every_request(merged))
    return row


def ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x is not None and y else None


def spread(xs: list[float | None]) -> dict | None:
    """The median of per-round ratios and their range (rounds where a side had no figure left out)."""
    got = [x for x in xs if x is not None]
    return {"median": round(statistics.median(got), 3), "min": round(min(got), 3), "max": round(max(got), 3),
            "rounds": [None if x is None else round(x, 3) for x in xs]} if got else None


async def one_probe(t: Target, make, timeout: float) -> float:
    return (await probe_ms(t, make, 1, timeout))[0]


async def alternate(systems: dict[str, tuple[Target, object]], levels: dict[str, list[Level]], rounds: int,
                    seconds: float, timeout: float, model=None, texts: list[str] | None = None, pause: float = 0.5,
                    quiet_ms: dict[str, float] | None = None):
    """For each level (levels[system][i] is the i-th level of that system), `rounds` rounds, each system a turn of
    `seconds` per round, the order flipped every round, a `pause` before each turn; after an open-loop turn, that
    system is settled (quiet_ms[system]: the latency its idle server answers within). model: millis's in-process
    baseline, run for `seconds` before each of millis's concurrency-1 turns. -> ({system: [[Recorder per round]
    per level]}, [order per level and round], [in-process ms per round], {system: [settle seconds per turn]})."""
    names = list(systems)
    recs = {n: [[] for _ in levels[n]] for n in names}
    orders, inproc, settled = [], [], {n: [] for n in names}
    rng = np.random.default_rng(0)
    for i in range(len(levels[names[0]])):
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            orders.append(order)
            for n in order:
                lv = levels[n][i]
                t, make = systems[n]
                await asyncio.sleep(pause)  # the previous turn's stragglers and spinning threads settle
                if n == "millis" and model is not None and lv.kind == "closed" and lv.value == 1:
                    ms: list[float] = []
                    inproc_round(model, texts, seconds, rng, ms)
                    inproc.append(ms)
                if lv.kind == "closed":
                    rec = await closed_loop(t, make, int(lv.value), seconds, 0, timeout)
                else:  # the seed follows the level's name and the round: both systems get the same arrival times
                    rec = await open_loop(t, make, lv.value, seconds, 0, timeout,
                                          seed=zlib.crc32(f"{lv.name} {r}".encode()))
                recs[n][i].append(rec)
                if lv.kind == "open" and quiet_ms:
                    settled[n].append((await settle(lambda: one_probe(t, make, timeout), quiet_ms[n]))[0])
                row = summarize(lv, rec)
                print(f"    {n:>9} {lv.name:>10} round {r + 1}/{rounds}: {row['rps']:8.1f} req/s  p50 {row['p50_ms']} "
                      f"ms  p99 {row['p99_ms']} ms  ok {row['ok']}  429 {row['rejected']}  errors {row['errors']}  "
                      f"timeouts {row['timeouts']}", flush=True)
    return recs, orders, inproc, settled


def compare(levels: dict[str, list[Level]], recs: dict[str, list[list[Recorder]]]) -> tuple[list[dict], dict]:
    """Pooled rows per system and level, and per level millis / Infinity: pooled ratios and per-round ones."""
    rows, checks = [], {}
    for n, lvs in levels.items():
        for lv, rr in zip(lvs, recs[n]):
            rows.append({"system": n, **pool(lv, rr), "round_rows": [
                {k: v for k, v in {**summarize(lv, x), **every_request(x)}.items() if k != "warnings"} for x in rr]})
    if set(levels) == {"millis", "infinity"}:
        by = {(r["system"], r["load"]): r for r in rows}
        for lv in levels["millis"]:
            m, o = by[("millis", lv.name)], by[("infinity", lv.name)]
            checks[lv.name] = {
                "p99_ratio": ratio(m["all_p99_ms"], o["all_p99_ms"]), "rps_ratio": ratio(m["rps"], o["rps"]),
                "rounds_p99_ratio": spread([ratio(a["all_p99_ms"], b["all_p99_ms"])
                                            for a, b in zip(m["round_rows"], o["round_rows"])]),
                "rounds_rps_ratio": spread([ratio(a["rps"], b["rps"]) for a, b in zip(m["round_rows"], o["round_rows"])]),
                "millis_all_p99_ms": m["all_p99_ms"], "infinity_all_p99_ms": o["all_p99_ms"],
                "rate_rps": {"millis": m["value"], "infinity": o["value"]} if lv.kind == "open" else None}
    return rows, checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load level and system (all rounds)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per level, the systems alternated in each")
    ap.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds idle before each turn")
    ap.add_argument("--port", type=int, default=8790, help="Infinity's port (millis serve takes a free one)")
    ap.add_argument("--out", default=str(RESULTS / "serve_vs_infinity.json"))
    ap.add_argument("--millis-only", action="store_true", help="skip Infinity (a quick look; no comparison)")
    a = ap.parse_args()

    import millis
    from checkouts import write_result
    from millis.common.hardware import describe
    from millis.encoder.source import builtin_minilm_dir

    if not a.millis_only and not (INFINITY / ".millis-ok").exists():
        print("Infinity venv missing: run `bash bench/peers/setup.sh infinity` first", file=sys.stderr)
        return 2
    if not (ARTIFACT / "millis.json").exists():
        import accuracy  # bench/accuracy.py: the same MiniLM recipe at cosine >= 0.995

        accuracy.embed_recovery(iters=200, min_cosine=0.995)
    texts = read_column(data_root() / "banking77" / "test.csv", "text")
    seconds = a.duration / a.rounds
    variant = json.loads((ARTIFACT / "millis.json").read_text())["variant"]["name"]
    print(f"millis serve {ARTIFACT.name} ({variant})" + ("" if a.millis_only else "; infinity-emb (torch, cpu)"),
          flush=True)
    servers: dict[str, ServerProcess] = {}
    exits: dict[str, int | None] = {}
    try:
        servers["millis"] = ServerProcess(serve_command(ARTIFACT, "--model-name", "minilm"), ready_timeout=180)
        if not a.millis_only:
            servers["infinity"] = start_infinity(builtin_minilm_dir(), a.port)
        model = millis.load(ARTIFACT)  # the in-process baseline, same artifact
        systems, quiet = {}, {}
        for n, srv in servers.items():
            t = Target(srv.url)
            systems[n] = (t, request_maker(t, "/v1/embeddings", "minilm", texts, 1, seed=0))
            asyncio.run(warm(t, systems[n][1], 200, a.timeout))
            idle = statistics.median(asyncio.run(probe_ms(t, systems[n][1], 50, a.timeout)))
            quiet[n] = quiet_limit_ms(idle)  # settled: a request answered about as fast as on the idle server
        closed = {n: [Level("closed", c, f"c{c}") for c in CLOSED] for n in systems}
        recs, orders, inproc, _ = asyncio.run(alternate(systems, closed, a.rounds, seconds, a.timeout, model, texts,
                                                        a.pause))
        del model
        capacity = {n: max(pool(lv, rr)["rps"] for lv, rr in zip(closed[n], recs[n])) for n in systems}
        low = min(capacity.values())
        print(f"  capacity (best closed-loop req/s): {capacity}", flush=True)
        poisson = {n: [Level("open", capacity[n] * f, name) for f, name in OWN] +
                   [Level("open", low * f, name) for f, name in EQUAL] for n in systems}
        open_recs, open_orders, _, settled = asyncio.run(alternate(systems, poisson, a.rounds, seconds, a.timeout,
                                                                   pause=a.pause, quiet_ms=quiet))
    finally:
        exits = {n: s.stop() for n, s in servers.items()}

    levels = {n: closed[n] + poisson[n] for n in systems}
    rows, checks = compare(levels, {n: recs[n] + open_recs[n] for n in systems})
    by = {(r["system"], r["load"]): r for r in rows}
    inproc_all = [x for ms in inproc for x in ms]
    in_process = {"p50_ms": round(float(np.percentile(inproc_all, 50)), 3),
                  "p99_ms": round(float(np.percentile(inproc_all, 99)), 3), "calls": len(inproc_all)}
    c1 = by[("millis", "c1")]
    checks["c1_p50_overhead_ms"] = round(c1["p50_ms"] - in_process["p50_ms"], 3)
    checks["c1_rounds_p50_overhead_ms"] = spread([r["p50_ms"] - float(np.percentile(ms, 50))
                                                  for r, ms in zip(c1["round_rows"], inproc)])
    over = by[("millis", "overload2x")]
    machine = describe()
    result = {"bench": "serve_vs_infinity", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "cpu": machine["cpu"], "cpu_id": machine["cpu_id"], "isa": machine["isa"]},
              "machine": machine, "model": "all-MiniLM-L6-v2", "millis_variant": variant,
              "infinity": None if a.millis_only else {"version": infinity_version(), "engine": "torch", "device": "cpu"},
              "texts": "banking77 test, 1 per request", "duration_s": a.duration, "rounds": a.rounds,
              "seconds_per_turn": seconds, "timeout_s": a.timeout,
              "method": "both servers up; per level, rounds alternating which system goes first; Poisson levels at "
                        "each system's own capacity (poisson50/90, overload2x) and at the lower capacity for both "
                        "(equal50/90/2x); ratios on all_p99_ms (every request sent, non-2xx above the timeout)",
              "capacity_rps": capacity["millis"], "capacity": capacity, "in_process": in_process,
              "orders": {"closed": orders, "open": open_orders},
              "settle": {"quiet_ms": quiet, "seconds": settled},
              "millis_ready_s": round(servers["millis"].ready_s, 2),
              "infinity_ready_s": round(servers["infinity"].ready_s, 2) if "infinity" in servers else None,
              "millis_sigterm_exit": exits.get("millis"),
              "overload2x": {"answered_share": over["answered_share"], "admitted_p99_ms": over["p99_ms"],
                             "all_p99_ms": over["all_p99_ms"], "rejected": over["rejected"], "sent": over["sent"]},
              "checks": checks, "rows": rows}
    write_result(a.out, result, indent=2)
    plot({n: [r for r in rows if r["system"] == n] for n in systems}, Path(a.out).with_name("latency_vs_load.png"))

    print(f"\n{'system':>9} {'load':>10} {'rate':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'all p99':>9} "
          f"{'errors':>7} {'429':>6}")
    def ms(x):  # a percentile past the timeout is no latency
        return ">=timeout" if x is None else x

    def rounds(c):
        return f"[rounds {c['median']}, {c['min']}-{c['max']}]" if c else "[rounds: none]"

    for r in rows:
        rate = f"{r['value']:.0f}" if r["kind"] == "open" else "-"
        print(f"{r['system']:>9} {r['load']:>10} {rate:>7} {r['rps']:>9.1f} {ms(r['p50_ms'])!s:>9} "
              f"{ms(r['p99_ms'])!s:>9} {ms(r['all_p99_ms'])!s:>9} {r['errors'] + r['timeouts']:>7} {r['rejected']:>6}")
    print(f"\nin-process p50 {in_process['p50_ms']} ms; millis c1 p50 overhead {checks['c1_p50_overhead_ms']} ms, "
          f"round by round {checks['c1_rounds_p50_overhead_ms']} (target <= 0.5)")
    for load, c in checks.items():
        if isinstance(c, dict) and "p99_ratio" in c:
            p99 = c["p99_ratio"] if c["p99_ratio"] is not None else \
                f"- (p99s {ms(c['millis_all_p99_ms'])} / {ms(c['infinity_all_p99_ms'])} ms)"
            print(f"  {load:>10}: p99 (every request) ratio {p99} {rounds(c['rounds_p99_ratio'])} (target <= 0.7), "
                  f"req/s ratio {c['rps_ratio']} {rounds(c['rounds_rps_ratio'])} (>= 1.3)")
    print(f"overload 2x: answered {over['answered_share']:.2%}, admitted p99 {ms(over['p99_ms'])} ms, every request's "
          f"p99 {ms(over['all_p99_ms'])} ms; SIGTERM exit {exits.get('millis')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

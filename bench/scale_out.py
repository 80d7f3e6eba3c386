"""`millis serve` on Ray Serve against the single-process server, same artifact, same machine, same run.

Systems (all started first, then alternated round by round, the order rotating):
  single-t2   `millis serve ART --threads 2`                      (one process, both cores)
  single-t1   `millis serve ART --threads 1`                      (the latency baseline for ray-1x1)
  ray-1x1     `millis serve ART --replicas 1 --threads 1`         (its own local Ray instance)
  ray-2x1     `millis serve ART --replicas 2 --threads 1`         (its own local Ray instance)
Per round and system: a closed loop at --concurrency (throughput, p50 / p99) and one at concurrency 1
(latency). Requests: one Banking77 test text each to /v1/embeddings ($MILLIS_DATA overrides
../shared/data). Ratios are of medians over rounds: ray-2x1 / ray-1x1 req/s at --concurrency (target
>= 1.6x), and ray-1x1's p50 at concurrency 1 minus single-t1's (Ray's added latency; target <= 1 ms).

Then the fault drill on ray-2x1: an open loop at half its measured capacity for --fault-s seconds, one
replica's process killed (SIGKILL) a third of the way in; reports requests lost (anything but 200),
and seconds until requests are answered by two replicas again, one of them new (target: 0 lost, back
within 30 s).

The artifact: all-MiniLM-L6-v2 (builtin:minilm, real weights) optimized to ort-int8-dynamic, cached
in bench/.cache/scale_out/. Writes bench/results/scale_out.json (CPU model and ISA included).

    .venv/bin/python bench/scale_out.py                           # the full run
    .venv/bin/python bench/scale_out.py --rounds 1 --duration 3   # smoke
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.common import hardware  # noqa: E402
from millis.common.config import Shape  # noqa: E402
from millis.common.readers import read_column  # noqa: E402
from millis.loadgen import request_maker  # noqa: E402
from millis.loadgen.client import Target  # noqa: E402
from millis.loadgen.load import Level, closed_loop, open_loop, summarize, warm  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402

RESULTS, CACHE = HERE / "results", HERE / ".cache" / "scale_out"
SYSTEMS = {"single-t2": ("--threads", "2"), "single-t1": ("--threads", "1"),
           "ray-1x1": ("--threads", "1", "--replicas", "1"), "ray-2x1": ("--threads", "1", "--replicas", "2")}
ROUTE = "/v1/embeddings"


def data_root() -> Path:
    return Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")


def artifact() -> Path:
    from millis.optimize.config import MeasureConfig, OptimizeConfig
    from millis.optimize.pipeline import optimize

    out = CACHE / "minilm-int8"
    if not (out / "millis.json").exists():
        measure = MeasureConfig(shapes=(Shape(1, 128),), warmup=2, iters=10, rounds=1, serve_mix=0)
        optimize(OptimizeConfig(source="builtin:minilm", task="embed", out=str(out), variants=("ort-int8-dynamic",),
                                measure=measure))
    return out


def answered_by(url: str) -> tuple[int, str, int]:
    """(status, replica id, its pid) of one request (x-millis-replica: "<id> pid <pid>")."""
    t = Target(url)
    c = http.client.HTTPConnection(t.host, t.port, timeout=30)
    try:
        c.request("POST", ROUTE, json.dumps({"input": ["where is my card?"]}), {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        name, _, pid = (r.getheader("x-millis-replica") or "").partition(" pid ")
        return r.status, name, int(pid or 0)
    finally:
        c.close()


def replica_names(url: str, tries: int = 24) -> set[str]:
    """The replicas that answer a few requests."""
    return {name for status, name, _ in (answered_by(url) for _ in range(tries)) if status == 200}


def fault_drill(url: str, make, capacity: float, seconds: float) -> dict:
    """Kill one replica at a third of an open loop at half capacity: lost requests, seconds to recover."""
    t = Target(url)
    _, victim, pid = answered_by(url)

    async def drill():
        loop = asyncio.create_task(open_loop(t, make, capacity / 2, seconds, 0, 30.0, 1))
        await asyncio.sleep(seconds / 3)
        os.kill(int(pid), signal.SIGKILL)
        killed = time.perf_counter()
        return await loop, killed

    rec, killed = asyncio.run(drill())
    back = None
    while time.perf_counter() - killed < 60:
        names = replica_names(url, 8)
        if len(names) == 2 and victim not in names:
            back = round(time.perf_counter() - killed, 1)
            break
    s = summarize(Level("open", capacity / 2, "half"), rec)
    return {"rate_rps": round(capacity / 2, 1), "sent": s["sent"], "ok": s["ok"],
            "lost": s["sent"] - s["ok"], "p99_ms": s["p99_ms"], "back_s": back}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per closed-loop segment")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--fault-s", type=float, default=12.0)
    ap.add_argument("--out", default=str(RESULTS / "scale_out.json"))
    a = ap.parse_args()
    art = artifact()
    texts = read_column(data_root() / "banking77" / "test.csv", "text")
    servers: dict[str, ServerProcess] = {}
    recs: dict[str, dict[str, list]] = {k: {"c": [], "c1": []} for k in SYSTEMS}
    try:
        for k, flags in SYSTEMS.items():
            servers[k] = ServerProcess(serve_command(art, "--model-name", "minilm", *flags), ready_timeout=300,
                                       log=CACHE / f"{k}.log")
            print(f"  {k}: ready in {servers[k].ready_s:.1f} s", flush=True)
        makers = {k: request_maker(Target(s.url), ROUTE, "minilm", texts, 1, seed=0) for k, s in servers.items()}
        for k, s in servers.items():
            asyncio.run(warm(Target(s.url), makers[k], 32, 30.0))
        names = list(SYSTEMS)
        for r in range(a.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t = Target(servers[k].url)
                recs[k]["c"].append(asyncio.run(closed_loop(t, makers[k], a.concurrency, a.duration, 0, 30.0)))
                recs[k]["c1"].append(asyncio.run(closed_loop(t, makers[k], 1, a.duration / 2, 0, 30.0)))
                print(f"  round {r + 1}/{a.rounds} {k}", flush=True)
        rows = {}
        for k in names:
            c = [summarize(Level("closed", a.concurrency, "c"), x) for x in recs[k]["c"]]
            c1 = [summarize(Level("closed", 1, "c1"), x) for x in recs[k]["c1"]]
            med = lambda xs, key: round(statistics.median(x[key] for x in xs), 3)  # noqa: E731
            rows[k] = {"rps": med(c, "rps"), "p50_ms": med(c, "p50_ms"), "p99_ms": med(c, "p99_ms"),
                       "c1_p50_ms": med(c1, "p50_ms"), "c1_p99_ms": med(c1, "p99_ms"),
                       "errors": sum(x["sent"] - x["ok"] for x in c + c1), "ready_s": round(servers[k].ready_s, 1),
                       "rounds_rps": [x["rps"] for x in c], "rounds_c1_p50": [x["p50_ms"] for x in c1]}
        fault = fault_drill(servers["ray-2x1"].url, makers["ray-2x1"], rows["ray-2x1"]["rps"], a.fault_s)
    finally:
        for s in servers.values():
            s.stop()
    scale = rows["ray-2x1"]["rps"] / rows["ray-1x1"]["rps"]
    added = rows["ray-1x1"]["c1_p50_ms"] - rows["single-t1"]["c1_p50_ms"]
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": hardware.describe(), "cpu": hardware.cpu_model(),
           "artifact": "builtin:minilm ort-int8-dynamic", "concurrency": a.concurrency, "rounds": a.rounds,
           "duration_s": a.duration, "rows": rows, "scale_2x1_over_1x1": round(scale, 3),
           "ray_added_p50_ms_c1": round(added, 3), "fault": fault}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{hardware.cpu_model()}, ISA {' '.join(hardware.describe()['isa'])}; MiniLM ort-int8-dynamic, "
          f"{ROUTE}, medians of {a.rounds} rounds")
    print(f"{'system':<10} {'req/s c' + str(a.concurrency):>10} {'p50 ms':>8} {'p99 ms':>8} {'c1 p50':>8} "
          f"{'c1 p99':>8} {'errors':>6}")
    for k, r in rows.items():
        print(f"{k:<10} {r['rps']:10.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['c1_p50_ms']:8.2f} "
              f"{r['c1_p99_ms']:8.2f} {r['errors']:6d}")
    verdict = "met" if scale >= 1.6 else "NOT met"
    print(f"ray-2x1 / ray-1x1 at c{a.concurrency}: {scale:.2f}x (target >= 1.6x: {verdict})")
    print(f"Ray's added p50 at c1 (ray-1x1 - single-t1): {added:.2f} ms (target <= 1 ms: "
          f"{'met' if added <= 1 else 'NOT met'})")
    print(f"fault drill: {fault}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

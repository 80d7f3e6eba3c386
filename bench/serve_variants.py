"""Every candidate variant of one model behind `millis serve`: closed loop at concurrency 16, systems
alternated, against the artifact `millis optimize` ships by default.

Issue 13 (item 4): selection timed variants at warm shapes only, and the default MiniLM artifact
(ov-bf16 on an AVX512-BF16 CPU) served 6.8 req/s at concurrency 16 against 107.8 for ORT int8: it
compiled every new batch shape. Target: on any CPU the default artifact's closed-loop req/s at
concurrency 16 is >= 0.9x the best variant's, same server, same run.

For one source (default builtin:minilm, task embed) this builds the default artifact (`optimize` with
its defaults, serve mix included) and one artifact per candidate variant (that variant shipped
whatever selection would say: ort-fp32-fused, the ORT int8 variants, ov-fp32, ov-int8, and ov-bf16
where the CPU has native bf16). Every artifact is served by its own `millis serve` (all started first,
one at a time, each warmed); then `--rounds` rounds of closed-loop segments at `--concurrency`
alternate between the servers, the order rotating each round. Per variant: req/s, p50 / p99 over the
pooled rounds, server RSS (VmRSS after its segments, VmHWM peak), seconds to /ready, fidelity verdict
from the artifact's report. Texts: Banking77 test, one per request to /v1/embeddings ($MILLIS_DATA
overrides ../shared/data). Artifacts are cached in bench/.cache/serve_variants/ (--rebuild to redo).
Writes bench/results/serve_variants.json (CPU model and ISA flags included) and prints a table.

    .venv/bin/python bench/serve_variants.py                                   # the full run
    .venv/bin/python bench/serve_variants.py --quick --duration 4 --rounds 1 --out /tmp/sv.json  # smoke
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.common import hardware  # noqa: E402
from millis.optimize.config import PRESETS, MeasureConfig, OptimizeConfig
from millis.common.config import Shape  # noqa: E402
from millis.common.readers import read_column  # noqa: E402
from millis.loadgen import request_maker  # noqa: E402
from millis.loadgen.client import Target  # noqa: E402
from millis.loadgen.load import Level, Recorder, closed_loop, summarize, warm  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402
from millis.optimize.pipeline import optimize  # noqa: E402
from millis.optimize.select import Candidate  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / ".cache" / "serve_variants"
CANDIDATES = ("ort-fp32-fused", "ort-int8-dynamic", "ort-int8-dynamic-pc", "ort-int8-attention", "ort-int8-static",
              "ov-fp32", "ov-int8", "ov-bf16")
TARGET_RATIO = 0.9
# one named variant shipped: enough measurement to write its report, no serve mix, no recovery
SHIP_ONE = MeasureConfig(shapes=(Shape(1, 128),), warmup=2, iters=10, rounds=1, serve_mix=0)


def data_root() -> Path:
    return Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")


def candidates(names: str) -> list[str]:
    wanted = [n for n in names.split(",") if n] if names else list(CANDIDATES)
    return [n for n in wanted if n != "ov-bf16" or hardware.has_bf16()]  # bf16 only where it is native


def ship(name: str):
    """`optimize`'s choose: the named variant, whatever selection would say."""
    def choose(cands: list[Candidate]) -> Candidate:
        for c in cands:
            if c.name == name:
                return c
        raise RuntimeError(f"{name} was not built (see the progress log)")
    return choose


def build(source: str, task: str, name: str, out: Path, quick: bool, rebuild: bool) -> Path:
    """The default artifact (name "default") or one shipping the variant `name`; cached."""
    if (out / "millis.json").is_file() and not rebuild:
        return out
    log = lambda msg: print(f"    [{name}] {msg}", flush=True)  # noqa: E731
    if name == "default":  # exactly `millis optimize SOURCE --task TASK` (or its quick preset)
        cfg = OptimizeConfig(source=source, task=task, out=str(out), **({"preset": "quick", "measure": PRESETS["quick"]}
                                                                          if quick else {}))
        return optimize(cfg, log)
    cfg = OptimizeConfig(source=source, task=task, out=str(out), variants=(name,), recover=False, measure=SHIP_ONE)
    return optimize(cfg, log, choose=ship(name))


def report_row(art: Path) -> dict:
    meta = json.loads((art / "millis.json").read_text())
    report = json.loads((art / "report.json").read_text())
    row = next(r for r in report["variants"] if r["name"] == meta["variant"]["name"])
    return {"variant": meta["variant"]["name"], "within_budget": bool(row["ok"]), "reason": row["reason"],
            "serve_mix_rows_per_s": (row.get("serve_mix") or {}).get("rows_per_s")}


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def pooled(recs: list[Recorder]) -> Recorder:
    """The rounds of one variant as one recording: latencies pooled, time = the segments' sum."""
    out = Recorder()
    for r in recs:
        out.lat += r.lat
        out.status += r.status
    out.t_first, out.t_last = 0.0, sum(r.t_last - r.t_first for r in recs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="builtin:minilm")
    ap.add_argument("--task", default="embed", choices=["embed", "classify"])
    ap.add_argument("--variants", default="", help=f"comma-separated candidates (default: {','.join(CANDIDATES)})")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per variant, split over rounds")
    ap.add_argument("--rounds", type=int, default=4, help="alternation rounds (server order rotates)")
    ap.add_argument("--warmup", type=int, default=50, help="sequential requests per server before the first round")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    ap.add_argument("--threads", type=int, default=0, help="server runtime threads (0 = all cores)")
    ap.add_argument("--quick", action="store_true", help="quick preset for the default artifact (smoke only: "
                    "not what `millis optimize` ships)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild cached artifacts")
    ap.add_argument("--out", default=str(RESULTS / "serve_variants.json"))
    a = ap.parse_args()

    texts = read_column(data_root() / "banking77" / "test.csv", "text")
    cache = CACHE / f"{a.source.replace(':', '-').replace('/', '_')}-{a.task}"
    cache.mkdir(parents=True, exist_ok=True)

    print(f"building artifacts in {cache}", flush=True)
    t0 = time.time()
    default_dir = cache / ("default-quick" if a.quick else "default")  # a smoke never stands in for the real one
    arts = {"default": build(a.source, a.task, "default", default_dir, a.quick, a.rebuild)}
    default_variant = report_row(arts["default"])["variant"]
    print(f"  default ships {default_variant}", flush=True)
    skipped = {}
    for name in candidates(a.variants):
        if name == default_variant:
            continue  # the default artifact is that variant: serve it once, as the default
        try:
            arts[name] = build(a.source, a.task, name, cache / name, a.quick, a.rebuild)
        except Exception as e:  # a variant that does not build here (a runtime missing) is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {e}"
            print(f"  skipped {name}: {skipped[name][:200]}", flush=True)
    build_s = time.time() - t0

    facts = {k: report_row(p) for k, p in arts.items()}
    label = {k: f"{default_variant} (default)" if k == "default" else k for k in arts}
    servers: dict[str, ServerProcess] = {}
    rss = {}
    try:
        for k in arts:  # started one at a time: each warms up alone
            servers[k] = ServerProcess(serve_command(arts[k], "--model-name", k, "--threads", str(a.threads)),
                                       log=cache / f"{k}.serve.log")
            rss[k] = {"VmRSS": 0.0}
            print(f"  {label[k]}: ready in {servers[k].ready_s:.1f} s on {servers[k].url}", flush=True)

        route = "/v1/embeddings" if a.task == "embed" else "/v1/classify"
        makers = {k: request_maker(Target(srv.url), route, k, texts, 1, seed=0) for k, srv in servers.items()}
        for k, srv in servers.items():
            asyncio.run(warm(Target(srv.url), makers[k], a.warmup, a.timeout))

        names, recs = list(servers), {k: [] for k in servers}
        seconds = a.duration / a.rounds
        for r in range(a.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                rec = asyncio.run(closed_loop(Target(servers[k].url), makers[k], a.concurrency, seconds, 0, a.timeout))
                recs[k].append(rec)
                st = proc_status_mb(servers[k].pid)
                rss[k] = {"VmRSS": max(rss[k]["VmRSS"], st["VmRSS"]), "VmHWM": st["VmHWM"]}
                rps = sum(200 <= s < 300 for s in rec.status) / max(rec.t_last - rec.t_first, 1e-9)
                print(f"  round {r + 1}/{a.rounds} {label[k]:<34} {rps:7.1f} req/s", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()

    level = Level("closed", a.concurrency, f"c{a.concurrency}")
    rows = []
    for k in servers:
        s = summarize(level, pooled(recs[k]))
        rows.append({"name": label[k], "variant": facts[k]["variant"], "default": k == "default",
                     "within_budget": facts[k]["within_budget"], "reason": facts[k]["reason"],
                     "rps": s["rps"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "ok": s["ok"],
                     "errors": s["errors"] + s["timeouts"], "rejected": s["rejected"],
                     "rss_mb": round(rss[k]["VmRSS"], 1), "peak_rss_mb": round(rss[k].get("VmHWM", 0.0), 1),
                     "ready_s": round(servers[k].ready_s, 2), "serve_mix_rows_per_s": facts[k]["serve_mix_rows_per_s"]})
    best = max(rows, key=lambda r: r["rps"])
    best_ok = max((r for r in rows if r["within_budget"]), key=lambda r: r["rps"], default=best)
    dflt = next(r for r in rows if r["default"])
    for r in rows:
        r["ratio_to_best"] = round(r["rps"] / best["rps"], 3) if best["rps"] else None

    print(f"\n{a.source} ({a.task}), closed loop c{a.concurrency}, {a.duration:g} s per variant over {a.rounds} "
          f"rounds; {hardware.cpu_model()}, ISA {' '.join(hardware.describe()['isa'])}")
    print(f"{'variant':<36} {'budget':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>7} {'peak MB':>8} "
          f"{'ready s':>7} {'x best':>7} {'errors':>6}")
    for r in sorted(rows, key=lambda r: -r["rps"]):
        print(f"{r['name']:<36} {'ok' if r['within_budget'] else 'no':>6} {r['rps']:8.1f} {r['p50_ms'] or 0:8.1f} "
              f"{r['p99_ms'] or 0:8.1f} {r['rss_mb']:7.0f} {r['peak_rss_mb']:8.0f} {r['ready_s']:7.1f} "
              f"{r['ratio_to_best']:7.3f} {r['errors']:6d}")
    ratio = dflt["rps"] / best["rps"] if best["rps"] else 0.0
    ratio_ok = dflt["rps"] / best_ok["rps"] if best_ok["rps"] else 0.0
    print(f"\ndefault ({default_variant}): {ratio_ok:.3f}x the best within the fidelity budget ({best_ok['name']}), "
          f"target >= {TARGET_RATIO}x {'met' if ratio_ok >= TARGET_RATIO else 'NOT met'}; "
          f"{ratio:.3f}x the best of all ({best['name']}), {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    if skipped:
        print("skipped: " + "; ".join(f"{k}: {v[:120]}" for k, v in skipped.items()))

    result = {"bench": "serve_variants", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": a.source,
              "task": a.task, "hardware": hardware.describe(), "bf16_native": hardware.has_bf16(),
              "quick_default": a.quick,
              "texts": f"banking77 test, 1 per request, {route}", "concurrency": a.concurrency,
              "duration_s_per_variant": a.duration, "rounds": a.rounds, "warmup_requests": a.warmup,
              "build_s": round(build_s, 1),
              "default": {"variant": default_variant, "rps": dflt["rps"], "target_ratio": TARGET_RATIO,
                          # the variants selection may ship: within the fidelity budget
                          "best_within_budget": best_ok["name"], "ratio_to_best_within_budget": round(ratio_ok, 3),
                          "meets_target": ratio_ok >= TARGET_RATIO,
                          # every variant served, those outside the budget too
                          "best": best["name"], "ratio_to_best": round(ratio, 3),
                          "meets_target_vs_all": ratio >= TARGET_RATIO},
              "skipped": skipped, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an open /dashboard costs the server it watches: p50 latency at concurrency 1 with the page
polling against without, on the encoder server (MiniLM embeddings) and the generation server
(SmolLM2-135M-Instruct chat, builtin:smollm2), in one run.

Each round times three phases of `--seconds` each on the same server, the order rotated round by round:
- off:     one closed-loop client, nothing else;
- poll:    the same, plus what an open page sends: GET /dashboard once, then GET /stats?window=300 every
           second (the page's own poll), from another thread;
- browser: the same, with the real page open in headless Chromium (tests/browser.py) on this same
           2-core machine: the browser's own rendering competes for the cores too (a viewer normally
           watches from another machine, so this is the pessimistic case). Skipped without Chromium.
Ratio = phase p50 / off p50 of the same round; the median of per-round ratios [min-max] is reported.
Target (issue 19): poll / off <= 1.05. Writes bench/results/dashboard_cost.json.

    .venv/bin/python bench/dashboard_cost.py [--rounds 6] [--seconds 12] [--servers encoder,generation]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))  # the browser harness

from millis.common.hardware import describe  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402

ENCODER = HERE / ".cache" / "artifacts" / "minilm-embed"  # bench/accuracy.py builds it
REQUESTS = {
    "encoder": ("/v1/embeddings", {"input": ["where is my card? I lost it yesterday at the station"]}),
    "generation": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour."}],
                                            "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
}


def client(s: ServerProcess, route: str, body: dict, seconds: float) -> list[float]:
    """Closed loop at concurrency 1 for `seconds`: each request's wall time (ms)."""
    out, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        status, _, text = s.request("POST", route, body)
        if status != 200:
            raise SystemExit(f"{route}: {status} {text[:300]!r}")
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def poller(s: ServerProcess, stop: threading.Event) -> None:
    s.get("/dashboard")
    while not stop.wait(1.0):
        s.get("/stats?window=300")


def phase(s: ServerProcess, kind: str, route: str, body: dict, seconds: float) -> list[float]:
    if kind == "off":
        return client(s, route, body, seconds)
    if kind == "poll":
        stop = threading.Event()
        t = threading.Thread(target=poller, args=(s, stop), daemon=True)
        t.start()
        try:
            return client(s, route, body, seconds)
        finally:
            stop.set()
            t.join()
    from browser import Browser

    with Browser() as b:
        page = b.open(f"{s.url}/dashboard", wait_s=1.0)
        got = client(s, route, body, seconds)
        errors = page.errors
    if errors:
        raise SystemExit(f"the dashboard raised JavaScript errors: {errors}")
    return got


def start(name: str) -> ServerProcess:
    if name == "encoder":
        if not (ENCODER / "millis.json").exists():
            raise SystemExit(f"{ENCODER} is missing: build it with bench/accuracy.py (or millis optimize "
                             f"builtin:minilm --task embed --out {ENCODER})")
        return ServerProcess(serve_command(ENCODER, "--threads", "2"), ready_timeout=300)
    return ServerProcess(serve_command("builtin:smollm2", "--threads", "2"), ready_timeout=300)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--servers", default="encoder,generation")
    a = ap.parse_args()
    from browser import Browser

    kinds = ["off", "poll"] + (["browser"] if Browser.available()[0] else [])
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "machine": describe(),
           "rounds": a.rounds, "seconds": a.seconds, "phases": kinds, "servers": {}}
    for name in a.servers.split(","):
        route, body = REQUESTS[name]
        s = start(name)
        try:
            client(s, route, body, 3.0)  # warm
            rounds = []
            for r in range(a.rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
                p50 = {k: statistics.median(phase(s, k, route, body, a.seconds)) for k in order}
                rounds.append({k: round(v, 3) for k, v in p50.items()})
                print(f"{name} round {r + 1}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in rounds[-1].items()),
                      flush=True)
        finally:
            s.stop()
        res = {"route": route, "rounds": rounds}
        for k in kinds[1:]:
            ratios = [x[k] / x["off"] for x in rounds]
            res[f"{k}_over_off"] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                    "max": round(max(ratios), 3)}
        res["p50_ms"] = {k: round(statistics.median(x[k] for x in rounds), 3) for k in kinds}
        out["servers"][name] = res
    print(f"\n{out['machine']['cpu']} ({' '.join(out['machine']['isa'])}), {a.rounds} rounds x {a.seconds:.0f} s "
          f"per phase, concurrency 1")
    print(f"{'server':<11} {'phase':<8} {'p50 ms':>8} {'x off [min-max]':>20}")
    for name, res in out["servers"].items():
        for k in kinds:
            x = res.get(f"{k}_over_off")
            ratio = "{median:.3f} [{min:.3f}-{max:.3f}]".format(**x) if x else "-"
            print(f"{name:<11} {k:<8} {res['p50_ms'][k]:>8.2f} {ratio:>20}")
    path = HERE / "results" / "dashboard_cost.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

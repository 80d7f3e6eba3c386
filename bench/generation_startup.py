"""Time to ready of `millis serve builtin:smollm2` at its defaults, after a first (unrecorded) run has built
the kernels: process start -> GET /ready answers 200 (interpreter, imports, GGUF read and repack, KV,
warm-up), and the server's own load time (/health cold_start_s, also millis_cold_start_seconds).

    .venv/bin/python bench/generation_startup.py [--runs 5]

Writes bench/results/generation_startup.json and prints the runs and their median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from millis.common.hardware import describe  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402


def start_once(threads: int) -> dict:
    srv = ServerProcess(serve_command("builtin:smollm2", "--threads", str(threads)))
    try:
        health = json.loads(srv.get("/health")[1])
        status, _, body = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        return {"ready_s": round(srv.ready_s, 3), "cold_start_s": health["cold_start_s"]}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "generation_startup.json"))
    a = ap.parse_args()
    first = start_once(a.threads)  # builds the kernels if this checkout has not yet
    runs = []
    for _ in range(a.runs):
        runs.append(start_once(a.threads))
        print(runs[-1], flush=True)
        time.sleep(1)
    m = describe()
    med = {k: statistics.median(r[k] for r in runs) for k in ("ready_s", "cold_start_s")}
    print(f"{m.get('cpu')} ({', '.join(m.get('isa', []))}), {a.threads} threads: time to ready median "
          f"{med['ready_s']:.2f} s (server's own load {med['cold_start_s']:.2f} s); first run {first['ready_s']:.2f} s")
    Path(a.out).write_text(json.dumps({"machine": m, "threads": a.threads, "first": first, "runs": runs,
                                       "median": med, "command": "bench/generation_startup.py " +
                                       " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

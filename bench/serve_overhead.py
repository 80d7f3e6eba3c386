"""What `millis serve` adds to one request: HTTP at concurrency 1 against the same model called in process,
alternated round by round, with the server's own stage times (its x-millis-* headers) beside them.

Model: `builtin:minilm` by default (all-MiniLM-L6-v2 served as it is: the torch-fp32 runtime, what
`millis serve builtin:minilm` runs), or any spec / artifact (--model). Texts: Banking77 test, one per
request, to /v1/embeddings. Per round: --seconds of in-process `open_model(...).run([text])`, then
--seconds of HTTP through one keep-alive connection (millis.loadgen's client). `server_inference_ratio` is
the server's median inference time over the in-process median: 1.0 when the server runs the model as
fast as a script does. Writes bench/results/serve_overhead.json.

    .venv/bin/python bench/serve_overhead.py [--model builtin:minilm] [--rounds 6] [--seconds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.common.hardware import describe  # noqa: E402
from millis.common.readers import read_column  # noqa: E402
from millis.loadgen.client import Conn, Target  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402

sys.path.insert(0, str(HERE))
from request_rounds import STAGES, http_round, inproc_round  # noqa: E402


def pcts(xs: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(xs, 50)), 3), "p99_ms": round(float(np.percentile(xs, 99)), 3),
            "n": len(xs)}


async def alternate(url: str, model, texts: list[str], rounds: int, seconds: float) -> dict:
    t = Target(url)
    conn = await Conn.connect(t)
    bodies = [t.request_bytes("POST", "/v1/embeddings", json.dumps({"model": "m", "input": [x]}).encode())
              for x in texts]
    rng = np.random.default_rng(0)
    inproc, http = [], []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for i in range(200):  # warm both
        model.run([texts[i % len(texts)]])
        await conn.send(bodies[i % len(bodies)])
    for _ in range(rounds):
        inproc_round(model, texts, seconds, rng, inproc)
        await http_round(conn, bodies, seconds, rng, http, stages)
    conn.close()
    res = {"in_process": pcts(inproc), "http_c1": pcts(http),
           "server_stages_p50_ms": {s: round(statistics.median(v), 3) for s, v in stages.items()}}
    res["overhead_p50_ms"] = round(res["http_c1"]["p50_ms"] - res["in_process"]["p50_ms"], 3)
    res["server_inference_ratio"] = round(res["server_stages_p50_ms"]["inference"] / res["in_process"]["p50_ms"], 3)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:minilm")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0, help="per system and round")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_overhead.json"))
    a = ap.parse_args()
    from millis.artifact.model import open_model

    data = Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")
    texts = read_column(data / "banking77" / "test.csv", "text")
    srv = ServerProcess(serve_command(a.model, "--model-name", "m"), ready_timeout=300)
    try:
        model = open_model(a.model)  # what the server loads for the same spec
        res = asyncio.run(alternate(srv.url, model, texts, a.rounds, a.seconds))
    finally:
        exit_code = srv.stop()
    res.update(bench="serve_overhead", model=a.model, variant=model.variant, machine=describe(),
               date=time.strftime("%Y-%m-%d"), rounds=a.rounds, seconds=a.seconds, sigterm_exit=exit_code,
               command="bench/serve_overhead.py " + " ".join(sys.argv[1:]))
    print(f"\n| system | p50 ms | p99 ms | n |\n|---|---|---|---|")
    for k in ("in_process", "http_c1"):
        print(f"| {k} | {res[k]['p50_ms']} | {res[k]['p99_ms']} | {res[k]['n']} |")
    print(f"server stages p50 (ms): {res['server_stages_p50_ms']}; HTTP overhead p50 {res['overhead_p50_ms']} ms; "
          f"server inference / in process {res['server_inference_ratio']}x; SIGTERM exit {exit_code}")
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

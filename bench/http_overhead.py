"""What the HTTP path of `millis serve` costs per request, apart from the model: a tiny model (so model
time is small) called in process vs over HTTP at concurrency 1, beside the raw floor of the framework
(a trivial Starlette route on the same uvicorn settings), alternated round by round.

Systems, each measured for --seconds per round through millis.loadgen's client (one keep-alive
connection, what bench/gpu_serve.py's `run_level` uses):
  in_process      `open_model(MODEL).run([text])` in this process (tokenize + runtime call)
  floor           uvicorn (uvloop, httptools, no access log) + Starlette, POST that reads the body and
                  answers fixed JSON: what any Starlette server pays
  floor_thread    the same route awaiting one no-op call in a worker thread (`run_in_executor`): the
                  floor plus one hand-off to a thread and back, as the batcher does per batch
  millis[:LABEL]  `millis serve MODEL` /v1/classify (an embedder: /v1/embeddings); --code DIR (repeatable,
                  LABEL=DIR) serves the same model from another checkout (e.g. the commit before a change) for a
                  before/after
Each round runs the systems (in_process among them) in a seeded random order (`in_process.orders`). Per millis
system the server's own stage headers (x-millis-queue/tokenize/inference-ms) are kept too, and per
round each system's p50: its overhead over the same round's in-process p50 (median and range over rounds), and
millis:here's p50 over each other checkout's, round by round.
With --gen, the streaming route as well: a llama2.c model (stories260K, ../shared/models) through
/v1/completions (64 tokens, EOS ignored), the gaps between streamed text events as the client reads them
and each request's mean gap ((last - first) / (events - 1)), vs the engine's own step time in process. With
a model this small the engine outruns the event loop and events arrive several to a read (gaps of ~0),
so the per-request mean is the figure to compare: over_in_process_p50_ms is its median less the median of the
in-process decodes' mean steps.

    PYTHONPATH=. .venv/bin/python bench/http_overhead.py [--model tiny:bert] [--rounds 5] [--seconds 2]
        [--code before=/tmp/millis-before] [--out bench/results/http_overhead_<cpu>.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from millis.common.hardware import cpu_flags, describe  # noqa: E402
from millis.common.readers import read_column  # noqa: E402
from millis.loadgen.client import Conn, Target  # noqa: E402
from millis.loadgen.process import HOST, ServerProcess  # noqa: E402

sys.path.insert(0, str(HERE))
from gpu_decode import steps_ms  # noqa: E402
from checkouts import checkouts, write_result  # noqa: E402
from request_rounds import STAGES, http_round, inproc_round  # noqa: E402

FLOOR_ANSWER = b'{"object":"list","model":"m","data":[{"index":0,"label":"neutral","score":0.34,"truncated":false}]}'


def floor_server(thread_hop: bool) -> None:
    """The framework alone on the settings `millis serve` uses (millis/serve/server.py)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    pool = ThreadPoolExecutor(max_workers=1)

    async def classify(request):
        await request.body()
        if thread_hop:
            await asyncio.get_running_loop().run_in_executor(pool, int)
        return Response(FLOOR_ANSWER, 200, media_type="application/json")

    async def ready(request):
        return Response(b'{"status":"ready"}', 200, media_type="application/json")

    app = Starlette(routes=[Route("/v1/classify", classify, methods=["POST"]),  # either task's route: the same answer
                            Route("/v1/embeddings", classify, methods=["POST"]), Route("/ready", ready)])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(128)
    print(f"floor: listening on http://{HOST}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off", access_log=False,
                            log_level="warning", timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


def millis_command(code: Path, model: str, *flags: str) -> list[str]:
    """`millis serve` from the checkout `code` (serve_command's flags; -c so the checkout comes first)."""
    boot = f"import runpy, sys; sys.path[0] = {str(code)!r}; runpy.run_module('millis.cli', run_name='__main__')"
    return [sys.executable, "-c", boot, "serve", model, "--host", HOST, "--port", "0", "--model-name", "m", *flags]


def pcts(xs: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(xs, 50)), 3), "p90_ms": round(float(np.percentile(xs, 90)), 3),
            "p99_ms": round(float(np.percentile(xs, 99)), 3), "n": len(xs)}


def route_of(model) -> tuple[str, str]:
    """(route, the field its texts go in) for the model's task: a classifier's or an embedder's route."""
    return ("/v1/classify", "inputs") if model.task == "classify" else ("/v1/embeddings", "input")


async def alternate(servers: dict[str, ServerProcess], model, texts: list[str], rounds: int,
                    seconds: float) -> dict:
    rng = np.random.default_rng(0)
    conns, bodies = {}, {}
    route, field = route_of(model)
    for name, srv in servers.items():
        t = Target(srv.url)
        conns[name] = await Conn.connect(t)
        bodies[name] = [t.request_bytes("POST", route, json.dumps({"model": "m", field: [x]}).encode()) for x in texts]
    lat: dict[str, list[float]] = {"in_process": [], **{n: [] for n in servers}}
    stages = {n: {s: [] for s in STAGES} for n in servers if n.startswith("millis")}
    for i in range(300):  # warm every system
        model.run([texts[i % len(texts)]])
        for n in servers:
            await conns[n].send(bodies[n][i % len(texts)])
    per_round: dict[str, list[float]] = {n: [] for n in lat}  # each round's p50 per system
    shuffle = random.Random(0)
    orders = []
    for _ in range(rounds):
        start = {n: len(v) for n, v in lat.items()}
        order = list(lat)
        shuffle.shuffle(order)  # a seeded random order each round: no system always follows the same one
        orders.append(order)
        for n in order:
            if n == "in_process":
                inproc_round(model, texts, seconds, rng, lat["in_process"])
            else:
                await http_round(conns[n], bodies[n], seconds, rng, lat[n], stages.get(n))
        for n, v in lat.items():
            per_round[n].append(statistics.median(v[start[n]:]))
    for c in conns.values():
        c.close()
    res = {n: pcts(v) for n, v in lat.items()}
    res["in_process"]["orders"] = orders
    for n, st in stages.items():
        res[n]["server_stages_p50_ms"] = {s: round(statistics.median(v), 3) for s, v in st.items()}
    for n, r in per_round.items():
        res[n]["round_p50_ms"] = [round(x, 3) for x in r]
        if n != "in_process":  # this round's p50 less the same round's in-process p50: the median and range
            over = [x - y for x, y in zip(r, per_round["in_process"])]
            res[n]["rounds_over_in_process_ms"] = {"median": round(statistics.median(over), 3),
                                                   "min": round(min(over), 3), "max": round(max(over), 3)}
    if "millis:here" in per_round:  # against each other checkout, round by round: here's p50 / its p50
        for n in per_round:
            if n.startswith("millis:") and n != "millis:here":
                ratio = [x / y for x, y in zip(per_round["millis:here"], per_round[n])]
                res["millis:here"][f"rounds_ratio_vs_{n}"] = {"median": round(statistics.median(ratio), 3),
                                                             "min": round(min(ratio), 3), "max": round(max(ratio), 3)}
    return res


# ---- the streaming route ------------------------------------------------------------------------

async def stream_itl(url: str, prompt: str, max_tokens: int, n: int) -> tuple[list[float], list[float]]:
    """Streamed /v1/completions answers, n requests one after another: (gaps between text events as read,
    first excluded; per request (last - first event) / (events - 1)), ms. The second holds when the client
    reads several events at once (a gap then reads ~0)."""
    t = Target(url)
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    gaps: list[float] = []
    means: list[float] = []
    for _ in range(n):
        r, w = await asyncio.open_connection(t.host, t.port)
        w.write(t.request_bytes("POST", "/v1/completions", body))
        await r.readuntil(b"\r\n\r\n")
        stamps = []
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            chunk = await r.readexactly(size + 2)
            if chunk.startswith(b"data: {") and b'"text":""' not in chunk:
                stamps.append(time.perf_counter())
        w.close()
        gaps += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
        if len(stamps) >= 2:  # a stream of one text event has no gap
            means.append((stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1))
    return gaps, means


def in_process_decoder(model: str, prompt: str, max_tokens: int):
    """A warmed engine, and a function that decodes `prompt` n times with it: per decode, the wall time of each
    engine step after the first (the prefill), ms. Called within the rounds, beside the servers."""
    from millis.gen import EngineConfig, open_engine

    eng = open_engine(model, EngineConfig(max_batch=4))
    ids = eng.tok.encode(prompt)
    steps_ms(eng, ids, max_tokens)  # warm-up
    return lambda n: [steps_ms(eng, ids, max_tokens)[1:] for _ in range(n)]


IN_PROCESS = "in process"  # the streaming comparison's baseline: the same decode on an engine in this process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:bert", help="a classifier or embedder: source model spec or artifact "
                                                         "(served on /v1/classify or /v1/embeddings)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per system and round")
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                    help="also serve from this checkout, as millis:LABEL (this checkout is millis:here)")
    ap.add_argument("--gen", action="store_true", help="also the streaming route (stories260K)")
    ap.add_argument("--out", default="")
    ap.add_argument("--floor-server", choices=("plain", "thread"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.floor_server:
        floor_server(a.floor_server == "thread")
        return 0
    from millis.artifact.model import open_model

    data = Path(os.environ.get("MILLIS_DATA") or ROOT.parent / "shared" / "data")
    texts = read_column(data / "banking77" / "test.csv", "text")
    me = [sys.executable, str(Path(__file__).resolve()), "--floor-server"]
    commands = {"floor": me + ["plain"], "floor_thread": me + ["thread"],
                "millis:here": millis_command(ROOT, a.model)}
    others = checkouts(ap, a.code)
    for label, d in others.items():
        commands[f"millis:{label}"] = millis_command(d, a.model)
    servers: dict[str, ServerProcess] = {}
    try:
        for name, cmd in commands.items():
            servers[name] = ServerProcess(cmd, ready_timeout=300)
        model = open_model(a.model)  # what the server loads for the same spec
        res = asyncio.run(alternate(servers, model, texts, a.rounds, a.seconds))
    finally:
        exits = {n: s.stop() for n, s in servers.items()}
    inproc = res["in_process"]["p50_ms"]
    for n in servers:
        res[n]["over_in_process_p50_ms"] = round(res[n]["p50_ms"] - inproc, 3)
    out = {"bench": "http_overhead", "model": a.model, "variant": model.variant, "route": route_of(model)[0],
           "client": "millis.loadgen.client.Conn, one keep-alive connection, concurrency 1 (asyncio loop)",
           "systems": res, "sigterm_exit": exits}
    print("\n| system | p50 ms | p90 ms | p99 ms | n | over in-process p50 ms | round by round [range] | "
          "server stages p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in res.items():
        o = r.get("rounds_over_in_process_ms")
        rr = f"{o['median']} [{o['min']}, {o['max']}]" if o else ""
        print(f"| {n} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['n']} | "
              f"{r.get('over_in_process_p50_ms', '')} | {rr} | {r.get('server_stages_p50_ms', '')} |")
    for k, v in res.get("millis:here", {}).items():
        if k.startswith("rounds_ratio_vs_"):
            print(f"millis:here p50 / {k[len('rounds_ratio_vs_'):]} p50, round by round: {v['median']} "
                  f"[{v['min']}-{v['max']}]")

    if a.gen:
        llm = ROOT.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
        prompt, max_tokens = "Once upon a time", 64
        decode = in_process_decoder(str(llm), prompt, max_tokens)
        labels = {"millis:here": ROOT, **{f"millis:{label}": d for label, d in others.items()}}
        gen_servers: dict[str, ServerProcess] = {}
        got = {n: ([], []) for n in labels}
        runs: list[list[float]] = []
        per_round: list[dict[str, float]] = []  # each round's median per-request mean gap (and in process)
        try:
            for n, code in labels.items():
                gen_servers[n] = ServerProcess(millis_command(code, str(llm), "--max-batch", "4"), ready_timeout=300)
                asyncio.run(stream_itl(gen_servers[n].url, prompt, max_tokens, 3))  # warm
            shuffle = random.Random(1)
            for _ in range(a.rounds):  # alternated, the in-process decode too: a seeded random order each round
                order = [*gen_servers, IN_PROCESS]
                shuffle.shuffle(order)
                here: dict[str, float] = {}
                for n in order:
                    if n == IN_PROCESS:
                        done = decode(2)
                        runs.extend(done)
                        here[n] = statistics.median(float(np.mean(r)) for r in done if r)
                        continue
                    gaps, means = asyncio.run(stream_itl(gen_servers[n].url, prompt, max_tokens, 6))
                    got[n][0].extend(gaps)
                    got[n][1].extend(means)
                    here[n] = statistics.median(means)
                per_round.append(here)
        finally:
            for srv in gen_servers.values():
                srv.stop()
        steps = [t for r in runs for t in r]
        # per decode, its mean step: what a stream's per-request mean gap ((last - first) / (events - 1)) reads
        run_means = [float(np.mean(r)) for r in runs if r]
        gen = {"model": "stories260K (llama2.c)", "route": "/v1/completions stream", "max_tokens": max_tokens,
               "in_process_itl": pcts(steps), "in_process_mean_step_ms": round(float(np.mean(steps)), 3),
               "in_process_request_mean_step_p50_ms": round(statistics.median(run_means), 3)}
        for n, (gaps, means) in got.items():
            gen[n] = {"itl": pcts(gaps), "request_mean_itl_p50_ms": round(statistics.median(means), 3)}
            # the per-request mean gap, not the p50 of gaps (~0 when events arrive several to a read)
            gen[n]["over_in_process_p50_ms"] = round(gen[n]["request_mean_itl_p50_ms"]
                                                     - gen["in_process_request_mean_step_p50_ms"], 3)
            diffs = [r[n] - r[IN_PROCESS] for r in per_round]
            gen[n]["rounds_over_in_process_ms"] = {"median": round(statistics.median(diffs), 3),
                                                   "min": round(min(diffs), 3), "max": round(max(diffs), 3)}
            gen[n]["over_in_process_basis"] = ("median per-request mean gap - median per-decode mean engine step, "
                                               "pooled; rounds_*: the same per round, the in-process decode "
                                               "alternated with the servers (before 2026-12-06 it ran first)")
            print(f"stream ITL {n}: {gen[n]}")
        print(f"stream ITL in process: {gen['in_process_itl']}")
        out["generation"] = gen

    machine = describe()
    flags = sorted(cpu_flags())
    out.update(machine=machine, cpu_flags=flags, date=time.strftime("%Y-%m-%d"), rounds=a.rounds,
               seconds=a.seconds, command="bench/http_overhead.py " + " ".join(sys.argv[1:]))
    slug = re.sub(r"[^a-z0-9]+", "_", machine["cpu"].lower()).strip("_") or "cpu"
    path = Path(a.out or HERE / "results" / f"http_overhead_{slug}.json")
    write_result(path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation under load: `millis serve` against llama.cpp's OpenAI server (llama-cpp-python[server]) on
the same GGUF, streamed chat requests with a shared 512-token system prompt.

    bash bench/peers/setup.sh llamacpp                 # once: llama-cpp-python's venv
    .venv/bin/python bench/generation_load.py [--rounds 2] [--duration 60]

- requests: the system message is a fixed ~512-token support policy (banking77's 77 intents written
  out); the user message is a banking77 test question (real customer text), drawn with one seed, so
  both servers get the same requests at the same times; greedy, max_tokens --max-tokens, streamed.
- capacity: llama.cpp's server runs one request at a time; its closed-loop throughput with one client
  (--capacity-s seconds) is its capacity. The open-loop rate is --load (0.8) x that capacity.
- load: Poisson arrivals at that rate for --duration s per system per round, the systems alternated
  (one server process at a time on the machine, each with 2 threads; llama.cpp with
  --interrupt_requests False, or a new request cuts off the running one). From `millis.loadgen.streams`:
  TTFT (from the scheduled send), ITL, output tokens/s over the level (all answered tokens / span),
  each request's own decode tokens/s, and goodput (TTFT <= 1 s and mean ITL <= 100 ms).
- saturation (--saturate C, 0 to skip): a closed loop of C clients for --capacity-s per system and round,
  alternated: the output tokens/s each server reaches when it is never idle. At a fixed offered rate both
  servers answer every request, so their output tokens/s over the level can differ only by a backlog;
  how many tokens a second each can give is this number.
Writes bench/results/generation_load.json and prints a table with the millis / llama.cpp ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import harness  # noqa: E402
from gguf_report import llamacpp_build  # noqa: E402

from millis.common.hardware import describe  # noqa: E402
from millis.gen.builtin import resolve_model  # noqa: E402
from millis.loadgen import BenchConfig, request_maker  # noqa: E402
from millis.loadgen.client import Target  # noqa: E402
from millis.loadgen.load import Level  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402
from millis.loadgen.streams import gen_level, gen_summary, stream_one  # noqa: E402

LLAMACPP = HERE / ".venvs" / "llamacpp" / "bin" / "python"


def system_prompt(path: Path, gguf: str, tokens: int = 512) -> str:
    """The support policy, cut to `tokens` tokens of the model's tokenizer."""
    from millis.gen.gguf import read_gguf

    cats = json.loads((Path(harness.data_root()) / "banking77" / "categories.json").read_text())
    names = cats if isinstance(cats, list) else list(cats)
    lines = [f"- {str(c).replace('_', ' ')}: answer from the bank's policy on {str(c).replace('_', ' ')}, "
             f"ask for the account number only when needed." for c in names]
    text = ("You are the support assistant of a retail bank. Be brief and polite. Never ask for a PIN or "
            "a full card number. Topics you handle:\n" + "\n".join(lines))
    tok = read_gguf(gguf).tokenizer
    text = tok.decode(tok.encode(text, special=False)[:tokens])
    path.write_text(text)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(system: str, gguf: str, threads: int, logdir: Path) -> ServerProcess:
    if system == "millis":
        return ServerProcess(serve_command(gguf, "--threads", str(threads), "--model-name", "smollm2"),
                             log=logdir / "millis.log")
    port = free_port()
    cmd = [str(LLAMACPP), "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port),
           "--model_alias", "smollm2", "--interrupt_requests", "False"]  # queue, not cut off, concurrent requests
    return ServerProcess(cmd, port=port, ready_path="/v1/models", log=logdir / "llamacpp.log")


def run(system: str, gguf: str, a, level: Level, cfg: BenchConfig, logdir: Path) -> dict:
    srv = start(system, gguf, a.threads, logdir)
    try:
        t = Target(srv.url)
        make = request_maker(t, "/v1/chat/completions", "smollm2", questions(a.questions), 1, a.seed, cfg)

        async def go():
            for _ in range(3):  # unrecorded: first requests load pages and caches
                await stream_one(t, make(), cfg.timeout, time.perf_counter())
            return await gen_level(t, make, level, cfg.duration, cfg.count, cfg.timeout, a.seed)

        results, span = asyncio.run(go())
        row = gen_summary(level, results, span, cfg.ttft_budget_ms / 1e3, cfg.itl_budget_ms / 1e3)
        row.update(system=system, ready_s=round(srv.ready_s, 2))
        return row
    finally:
        srv.stop()


def questions(n: int) -> list[str]:
    return harness.banking77_spread(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--capacity-s", type=float, default=40.0)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saturate", type=int, default=8, help="clients of the closed-loop saturation runs (0: none)")
    ap.add_argument("--out", default=str(HERE / "results" / "generation_load.json"))
    a = ap.parse_args()
    if not LLAMACPP.exists():
        sys.exit("llama.cpp's venv is missing: bash bench/peers/setup.sh llamacpp")
    t0 = time.time()
    gguf = resolve_model("builtin:smollm2")
    logdir = HERE / ".cache" / "generation_load"
    logdir.mkdir(parents=True, exist_ok=True)
    system = system_prompt(logdir / "system.txt", gguf)
    cfg = BenchConfig(url="-", data="-", max_tokens=a.max_tokens, system=str(logdir / "system.txt"),
                      duration=a.duration, timeout=120.0, seed=a.seed)
    cap = run("llamacpp", gguf, a, Level("closed", 1), BenchConfig(**{**cfg.__dict__, "duration": a.capacity_s}),
              logdir)
    rate = round(a.load * cap["rps"], 3)
    level = Level("open", rate, f"poisson{rate:g}")
    rows = []
    for r in range(a.rounds):
        for system_name in (["llamacpp", "millis"] if r % 2 == 0 else ["millis", "llamacpp"]):
            rows.append({**run(system_name, gguf, a, level, cfg, logdir), "round": r})
            print(json.dumps({k: rows[-1][k] for k in ("system", "round", "ok", "sent", "ttft_p50_ms", "ttft_p99_ms",
                                                         "output_tok_s", "request_tok_s_p50", "goodput")}), flush=True)

    saturated = []
    sat_cfg = BenchConfig(**{**cfg.__dict__, "duration": a.capacity_s})
    for r in range(a.rounds if a.saturate else 0):
        for system_name in (["millis", "llamacpp"] if r % 2 == 0 else ["llamacpp", "millis"]):
            saturated.append({**run(system_name, gguf, a, Level("closed", a.saturate), sat_cfg, logdir), "round": r})
            print(json.dumps({k: saturated[-1][k] for k in ("system", "round", "load", "ok", "output_tok_s",
                                                              "ttft_p50_ms", "request_tok_s_p50")}), flush=True)

    def med(rows: list[dict], system: str, key: str) -> float:
        return statistics.median(x[key] for x in rows if x["system"] == system and x[key] is not None)

    keys = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s", "request_tok_s_p50", "goodput")
    summary = {k: {s: med(rows, s, k) for s in ("millis", "llamacpp")} for k in keys}
    if saturated:
        summary["saturated_output_tok_s"] = {s: med(saturated, s, "output_tok_s") for s in ("millis", "llamacpp")}
    for k, s in summary.items():
        s["ratio"] = s["millis"] / s["llamacpp"] if s["llamacpp"] else None
    m = describe()
    print(f"\n{m.get('cpu')} ({', '.join(m.get('isa', []))}), {a.threads} threads each; llama.cpp capacity "
          f"{cap['rps']:.3f} req/s (c1), load {rate} req/s Poisson, {len(system)}-char system prompt")
    print(f"{'metric':22s} {'millis':>10s} {'llama.cpp':>10s} {'ratio':>7s}")
    for k, s in summary.items():
        print(f"{k:22s} {s['millis']:10.2f} {s['llamacpp']:10.2f} {s['ratio'] or float('nan'):7.3f}")
    out = {"machine": m, "threads": a.threads, "model": gguf, "capacity": cap, "rate": rate, "rows": rows,
           "saturated": saturated, "summary": summary, "llama_cpp_build": llamacpp_build(),
           "seconds": round(time.time() - t0),
           "command": "bench/generation_load.py " + " ".join(sys.argv[1:])}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Issue 13: 2x overload and a soak for `millis serve`: the encoder server, then the generation server.

Each server runs alone, a subprocess on a free 127.0.0.1 port, through: capacity (a closed loop of
--capacity-concurrency clients -> 2xx/s, after an unrecorded warm-up), overload (Poisson arrivals at
--overload-factor x capacity for --overload-s), soak (Poisson at --soak-load x capacity for --soak-s,
reported per --bin-s window), then SIGTERM (exit status, seconds to exit). Its RSS (/proc/PID/status
VmRSS) is sampled every --rss-every-s s. Latency runs from a request's scheduled send time to its full
answer (a stream: to `[DONE]`). Outcomes: 2xx (well-formed body), 429, 503, other (another status, a
broken connection, a malformed 2xx body) and client timeouts (--timeout, connecting included).

Encoder: `millis optimize builtin:minilm --task embed` (built once under --workdir), POST /v1/embeddings
with one Banking77 test text. Generation: ../shared/models/stories260K, POST /v1/completions from a few
story openings, max_tokens 32, temperature 0.8 with a seed each, --stream-share of them streamed.

Targets: overload: every request answered (2xx, 429 or 503), no client timeout. Soak: RSS growth
(mean of the last window / mean of the first - 1) < 5%; p99 of the last window <= 1.5x the first's.

    .venv/bin/python bench/serve_soak.py                      # writes bench/results/serve_soak.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.common.hardware import describe  # noqa: E402
from millis.common.readers import read_column  # noqa: E402
from millis.loadgen.client import Pool, Target  # noqa: E402
from millis.loadgen.load import percentiles  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402

STORIES = HERE.parent.parent / "shared" / "models" / "stories260K"
OPENINGS = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog went to the park",
            "There was a big red ball", "The sun was shining and", "A little bird sat on a tree"]
TARGETS = {"overload": "every request answered (2xx, 429 or 503), no client timeout",
           "soak_rss_growth_max": 0.05, "soak_p99_ratio_max": 1.5}
OUTCOMES = ("2xx", "429", "503", "other", "timeout")


def data_root() -> Path:
    return Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")


# ---------------------------------------------------------------- the server process and its RSS

def sigterm(srv: ServerProcess, timeout: float = 120) -> dict:
    """SIGTERM: the exit status, seconds to exit, and whether it had to be killed."""
    t0 = time.perf_counter()
    code = srv.stop(timeout=timeout)
    return {"exit_code": code, "exit_s": round(time.perf_counter() - t0, 2), "killed": code is None}


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """(seconds since the server was ready, phase, RSS MB) every `every` s, and whenever `sample()` is called."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.t0, self.phase = pid, every, time.perf_counter(), "ready"
        self.samples: list[tuple[float, str, float]] = []
        self.stopped = threading.Event()

    def sample(self) -> None:
        mb = rss_mb(self.pid)
        if mb is not None:
            self.samples.append((round(time.perf_counter() - self.t0, 2), self.phase, round(mb, 1)))

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()


# ---------------------------------------------------------------- the load: requests and loops

class Load(NamedTuple):
    target: Target                                          # where requests go
    make: Callable[[random.Random], tuple[bytes, bool]]     # rng -> (request bytes, streamed?)


def body_ok(body: bytes, stream: bool) -> bool:
    """A well-formed 2xx answer: embeddings `data` or completion `choices`; a stream that ends with
    [DONE] and has no error event (after the headers, the server can report errors only in the stream)."""
    if stream:
        return body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body
    try:
        doc = orjson.loads(body)
        return isinstance(doc, dict) and bool(doc.get("data") or doc.get("choices"))
    except orjson.JSONDecodeError:
        return False


def encoder_load(t: Target, texts: list[str]) -> Load:
    def make(rng: random.Random) -> tuple[bytes, bool]:
        body = orjson.dumps({"input": [rng.choice(texts)], "model": "minilm"})
        return t.request_bytes("POST", "/v1/embeddings", body), False
    return Load(t, make)


def generation_load(t: Target, max_tokens: int, stream_share: float) -> Load:
    def make(rng: random.Random) -> tuple[bytes, bool]:
        stream = rng.random() < stream_share
        body = orjson.dumps({"prompt": rng.choice(OPENINGS), "max_tokens": max_tokens, "temperature": 0.8,
                             "seed": rng.randrange(1 << 31), "stream": stream})
        return t.request_bytes("POST", "/v1/completions", body), stream
    return Load(t, make)


class Records:
    """One row per request: scheduled send (s since the phase began), latency (s), outcome, detail."""

    def __init__(self) -> None:
        self.t0, self.elapsed = time.perf_counter(), 0.0  # elapsed: set by the closed loop
        self.rows: list[tuple[float, float, str, str]] = []
        self.other_samples: list[str] = []  # the first few odd answers, for the report

    def add(self, t_sched: float, outcome: str, detail: str, body: bytes = b"") -> None:
        self.rows.append((t_sched - self.t0, time.perf_counter() - t_sched, outcome, detail))
        if outcome == "other" and len(self.other_samples) < 5:
            self.other_samples.append(f"{detail}: {body[:200]!r}")


async def send_one(pool: Pool, raw: bytes, stream: bool, timeout: float, rec: Records, t_sched: float) -> None:
    conn, reuse, body = None, False, b""
    try:
        async with asyncio.timeout(timeout):  # connecting included: the whole request is bounded
            conn = await pool.acquire()
            while conn.reader.at_eof():  # closed by the server while idle (keep-alive timeout): not an error
                conn.close()
                conn = await pool.acquire()
            status, _, body = await conn.send(raw)
        reuse = True
        if 200 <= status < 300:
            outcome, detail = ("2xx", "2xx") if body_ok(body, stream) else ("other", "2xx_bad_body")
        else:
            outcome, detail = (str(status), str(status)) if status in (429, 503) else ("other", str(status))
    except TimeoutError:
        outcome, detail = "timeout", "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        outcome, detail = "other", f"conn_error:{type(e).__name__}"
    if conn is not None:
        pool.release(conn, reuse)
    rec.add(t_sched, outcome, detail, body)


async def closed_loop(load: Load, clients: int, seconds: float, timeout: float, seed: int) -> Records:
    rec, stop_at = Records(), time.perf_counter() + seconds

    async def client(k: int) -> None:
        rng, pool = random.Random(seed * 1000 + k), Pool(load.target)
        while time.perf_counter() < stop_at:
            raw, stream = load.make(rng)
            await send_one(pool, raw, stream, timeout, rec, time.perf_counter())
        pool.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    rec.elapsed = time.perf_counter() - rec.t0  # the requests in flight at stop_at finish after it
    return rec


async def open_loop(load: Load, rate: float, seconds: float, timeout: float, seed: int) -> Records:
    """Poisson arrivals at `rate` for `seconds`; ends at most `timeout` s later (every request is bounded)."""
    rng, pool, rec, tasks = random.Random(seed), Pool(load.target), Records(), set()
    t_next = rec.t0
    while True:
        t_next += rng.expovariate(rate)
        if t_next - rec.t0 > seconds:
            break
        await asyncio.sleep(max(0.0, t_next - time.perf_counter()))  # behind schedule: still let sends run
        raw, stream = load.make(rng)
        task = asyncio.create_task(send_one(pool, raw, stream, timeout, rec, t_next))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*list(tasks))
    pool.close()
    return rec


# ---------------------------------------------------------------- summaries

def summarize(rows: list[tuple[float, float, str, str]], seconds: float) -> dict:
    """Percentiles as millis bench ranks them (`percentiles`): over every request not refused 429, one shed, failed
    or timed out lasting at least the timeout, so a window that degrades into 503s or timeouts has no p99 (null;
    the soak's p99 target then fails) rather than the survivors' fast one."""
    counts = Counter(r[2] for r in rows)
    asked = [r for r in rows if r[2] != "429"]
    pcts, beyond = percentiles(np.array([r[1] * 1e3 for r in asked]), np.array([r[2] == "2xx" for r in asked]),
                               {"p50_ms": 50, "p99_ms": 99, "max_ms": 100}, 2)
    return {"sent": len(rows), **{k: counts.get(k, 0) for k in OUTCOMES},
            "other_detail": dict(Counter(r[3] for r in rows if r[2] == "other")), "n": len(asked),
            **pcts, "beyond_timeout": beyond,
            "ok_rps": round(counts.get("2xx", 0) / seconds, 2), "offered_rps": round(len(rows) / seconds, 2)}


def phase(rec: Records, seconds: float, bin_s: float, rss: list[tuple[float, str, float]], name: str) -> dict:
    """Totals and per-bin rows (binned by scheduled send time; a short run gets one or more short bins)."""
    n_bins = max(1, round(seconds / bin_s))
    width = seconds / n_bins
    which = lambda t: min(int(t // width), n_bins - 1)  # noqa: E731 (late answers go to the last bin)
    mine = [(t, mb) for t, ph, mb in rss if ph == name]  # RSS placed by time since the phase's first sample
    bins = []
    for k in range(n_bins):
        mbs = [mb for t, mb in mine if which(t - mine[0][0]) == k]
        bins.append({"t0_s": round(k * width, 1), **summarize([r for r in rec.rows if which(r[0]) == k], width),
                     "rss_mb": round(sum(mbs) / len(mbs), 1) if mbs else None})
    return {"seconds": seconds, "bin_s": round(width, 2), **summarize(rec.rows, seconds), "bins": bins,
            "other_samples": rec.other_samples}


def print_server(name: str, s: dict) -> None:
    """One row per phase (capacity) or per window (overload, soak)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{name}: {s.get('model')}  (capacity {s.get('capacity_rps')} req/s)")
    for h in ("phase", "t0 s", "sent", *OUTCOMES, "p50 ms", "p99 ms", "2xx/s", "RSS MB"):
        t.add_column(h, justify="right")
    for ph in ("capacity", "overload", "soak"):
        for b in ([s[ph]] if ph == "capacity" else s[ph]["bins"]) if ph in s else []:
            row = [ph, b.get("t0_s", "all"), b["sent"], *(b[k] for k in OUTCOMES), b["p50_ms"], b["p99_ms"],
                   b["ok_rps"], b.get("rss_mb")]
            t.add_row(*("-" if v is None else str(v) for v in row))
    Console(width=160).print(t)
    for k, v in s.get("checks", {}).items():
        print(f"  {k}: {v}")


def checks(ov: dict, soak: dict) -> dict:
    """The issue's targets, measured and passed or not."""
    first, last = soak["bins"][0], soak["bins"][-1]
    answered = ov["2xx"] + ov["429"] + ov["503"]
    growth = last["rss_mb"] / first["rss_mb"] - 1 if first["rss_mb"] and last["rss_mb"] else None
    ratio = last["p99_ms"] / first["p99_ms"] if first["p99_ms"] and last["p99_ms"] else None
    return {"overload_answered_share": round(answered / ov["sent"], 4) if ov["sent"] else None,
            "overload_timeouts": ov["timeout"],
            "overload_pass": ov["sent"] > 0 and answered == ov["sent"] and ov["timeout"] == 0,
            "soak_rss_growth": None if growth is None else round(growth, 4),
            "soak_rss_pass": growth is not None and growth < TARGETS["soak_rss_growth_max"],
            "soak_p99_ratio": None if ratio is None else round(ratio, 3),
            "soak_p99_pass": ratio is not None and ratio <= TARGETS["soak_p99_ratio_max"],
            "soak_single_bin": len(soak["bins"]) == 1}  # then first == last: the soak checks compare a bin with itself


# ---------------------------------------------------------------- one server, four phases

def run_server(name: str, model: str, flags: list[str], make_load: Callable[[Target], Load], a, seed: int,
               clients: int) -> dict:
    try:
        srv = ServerProcess(serve_command(model, *flags), log=Path(a.workdir) / f"{name}-server.log")
    except RuntimeError as e:
        print(f"{name}: ERROR {e}", file=sys.stderr, flush=True)
        return {"model": model, "error": str(e)}
    sampler = RssSampler(srv.pid, a.rss_every_s)
    sampler.sample()
    sampler.start()
    out: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": model, "command": shlex.join(srv.cmd),
                 "pid": srv.pid, "ready_s": round(srv.ready_s, 2),
                 "rss_at_ready_mb": sampler.samples[0][2] if sampler.samples else None}
    try:
        load = make_load(Target(srv.url))

        def run_phase(ph: str, coro) -> Records:
            sampler.phase = ph
            sampler.sample()
            rec = asyncio.run(coro)
            sampler.sample()
            return rec

        run_phase("warmup", closed_loop(load, clients, a.warmup_s, a.timeout, seed))
        rec = run_phase("capacity", closed_loop(load, clients, a.capacity_s, a.timeout, seed + 1))
        out["capacity"] = {"concurrency": clients, "seconds": round(rec.elapsed, 2), **summarize(rec.rows, rec.elapsed)}
        capacity = out["capacity_rps"] = out["capacity"]["ok_rps"]
        if capacity <= 0:
            c = out["capacity"]
            raise RuntimeError(f"no 2xx in the capacity run ({c['sent']} sent: {c['other_detail']}); "
                               f"first answer: {rec.other_samples[:1]}")
        print(f"{name}: ready in {srv.ready_s:.1f} s, capacity {capacity:.1f} req/s at c{clients}", flush=True)

        rate = a.overload_factor * capacity
        rec = run_phase("overload", open_loop(load, rate, a.overload_s, a.timeout, seed + 2))
        out["overload"] = {"rate_rps": round(rate, 2), **phase(rec, a.overload_s, a.bin_s, sampler.samples, "overload")}
        print(f"{name}: overload done: {out['overload']['sent']} sent", flush=True)

        rate = a.soak_load * capacity
        rec = run_phase("soak", open_loop(load, rate, a.soak_s, a.timeout, seed + 3))
        soak = out["soak"] = {"rate_rps": round(rate, 2), **phase(rec, a.soak_s, a.bin_s, sampler.samples, "soak")}
        sampler.phase = "idle"
        sampler.sample()
        out["rss_at_end_mb"] = sampler.samples[-1][2] if sampler.samples else None

        out["checks"] = checks(out["overload"], soak)
    except Exception as e:  # record it and move on to the next server
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"{name}: ERROR {out['error']}", file=sys.stderr, flush=True)
    finally:
        sampler.phase = "sigterm"
        out["sigterm"] = sigterm(srv) if srv.proc.poll() is None else {"exit_code": srv.proc.returncode,
                                                                         "exited_early": True}
        sampler.stopped.set()
        out["rss_samples"] = sampler.samples  # (s since ready, phase, MB)
    return out


def build_encoder(workdir: Path) -> Path:
    art = workdir / "minilm-embed"
    if not (art / "millis.json").exists():
        print(f"building {art} (millis optimize builtin:minilm --task embed; once)", flush=True)
        with open(workdir / "optimize.log", "w") as fh:
            subprocess.run([sys.executable, "-m", "millis.cli", "optimize", "builtin:minilm", "--task", "embed",
                            "--out", str(art)], check=True, stdout=fh, stderr=subprocess.STDOUT)
    return art


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("encoder", "generation"), help="run one server (merged into an existing --out)")
    ap.add_argument("--capacity-s", type=float, default=15.0, help="closed-loop seconds that measure capacity")
    ap.add_argument("--capacity-concurrency", type=int, default=0,
                    help="clients of the capacity closed loop (0: encoder 16; generation 32, its --max-batch slots)")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="unrecorded closed-loop seconds before capacity")
    ap.add_argument("--overload-s", type=float, default=60.0, help="seconds of overload")
    ap.add_argument("--overload-factor", type=float, default=2.0, help="overload rate, x capacity")
    ap.add_argument("--soak-s", type=float, default=300.0, help="seconds of soak")
    ap.add_argument("--soak-load", type=float, default=0.7, help="soak rate, x capacity")
    ap.add_argument("--bin-s", type=float, default=60.0, help="report window (s); short phases get shorter bins")
    ap.add_argument("--rss-every-s", type=float, default=10.0, help="RSS sampling period (s)")
    ap.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="generation: max_tokens per request")
    ap.add_argument("--stream-share", type=float, default=0.25, help="generation: share of streamed requests")
    ap.add_argument("--threads", type=int, default=0, help="server --threads (0 = all cores)")
    ap.add_argument("--workdir", default="/tmp/millis-soak", help="cache for the encoder artifact, server logs")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_soak.json"))
    a = ap.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    out_path = Path(a.out)
    result = json.loads(out_path.read_text()) if a.only and out_path.exists() else {"servers": {}}
    result.update({"bench": "serve_soak", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "command": shlex.join([sys.executable, *sys.argv]), "host": describe(), "targets": TARGETS,
                   "settings": {k: v for k, v in vars(a).items() if k not in ("out", "workdir")}})
    threads = ["--threads", str(a.threads)]
    if a.only in (None, "encoder"):
        texts = read_column(data_root() / "banking77" / "test.csv", "text")
        art = build_encoder(workdir)
        s = run_server("encoder", str(art), ["--model-name", "minilm", *threads], lambda t: encoder_load(t, texts),
                       a, seed=100, clients=a.capacity_concurrency or 16)
        s.update(variant=json.loads((art / "millis.json").read_text()).get("variant", {}).get("name"),
                 request="POST /v1/embeddings, 1 Banking77 test text")
        result["servers"]["encoder"] = s
    if a.only in (None, "generation"):
        s = run_server("generation", str(STORIES), threads, lambda t: generation_load(t, a.max_tokens,
                                                                                       a.stream_share), a, seed=200,
                       clients=a.capacity_concurrency or 32)
        s["request"] = (f"POST /v1/completions, story openings, max_tokens {a.max_tokens}, temperature 0.8, "
                        f"seeded, {a.stream_share:.0%} streamed")
        result["servers"]["generation"] = s

    passes = [v for s in result["servers"].values() for k, v in s.get("checks", {}).items() if k.endswith("_pass")]
    result["all_pass"] = bool(passes) and all(passes) and not any("error" in s for s in result["servers"].values())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    for name, s in result["servers"].items():
        print_server(name, s)
        print(f"  sigterm: {s.get('sigterm')}" + (f"  ERROR: {s['error']}" if "error" in s else ""))
    print(f"all targets met: {result['all_pass']}; wrote {out_path}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

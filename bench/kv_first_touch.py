"""What a native decoder's first writes to its KV cache cost: the paged pool is fresh memory (numpy asks for
transparent huge pages on arrays this size), so the step that first writes a part of it waits for the kernel
to fault it in. Each run is a fresh process on `builtin:smollm2` (its GGUF, native kernels, 2 threads,
16 slots), from this checkout and from each --code checkout, alternated round by round:

  first_ms / second_ms   the first engine step after load (a ~35-token chat prompt's prefill and its first
                         token) and the same for a second prompt once the first request has ended
  fill_*                 then 16 requests of 24 random-token prompts at once (16 slots, 232 new tokens each,
                         prefix cache off): 128 blocks of the pool, most of them fresh, written as the rows
                         grow; the wave's steps' max, p99 and median (decode steps of 16 rows, the first
                         four prefills among them) and its wall time
  rss_mb                 VmRSS after the first request (the pool's touched pages included)
(the first three in one process, the wave in another)

    .venv/bin/python bench/kv_first_touch.py [--rounds 5] [--code before=/tmp/millis-before]
        [--out bench/results/kv_first_touch_<cpu>.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from checkouts import add_code_flag, checkouts, write_result  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, CODE)
import numpy as np
from millis.gen import EngineConfig, SamplingParams, chat_prompt, open_engine

def steps(eng):
    ts = []
    while eng.has_work:
        t = time.perf_counter(); eng.step(); ts.append((time.perf_counter() - t) * 1e3)
    return ts

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)

eng = open_engine("builtin:smollm2", EngineConfig(max_batch=16, threads=2, prefix_cache=False))
out = {}
if MODE == "first":
    eng.add(chat_prompt(eng, "Name three primary colors."), SamplingParams(max_tokens=4))
    out["first_ms"] = steps(eng)[0]
    out["rss_mb"] = rss_mb()
    eng.add(chat_prompt(eng, "What is the capital of France?"), SamplingParams(max_tokens=4))
    out["second_ms"] = steps(eng)[0]
else:
    rng = np.random.default_rng(0)
    for _ in range(16):
        eng.add([int(i) for i in rng.integers(1000, 40000, 24)], SamplingParams(max_tokens=232, ignore_eos=True))
    t0 = time.perf_counter()
    ts = steps(eng)
    out["fill_wall_ms"] = (time.perf_counter() - t0) * 1e3
    out["fill_max_ms"], out["fill_p99_ms"], out["fill_median_ms"] = max(ts), float(np.percentile(ts, 99)), float(np.median(ts))
    out["fill_rss_mb"] = rss_mb()
print("RESULT " + json.dumps(out))
"""

KEYS = ("first_ms", "second_ms", "rss_mb", "fill_max_ms", "fill_p99_ms", "fill_median_ms", "fill_wall_ms",
        "fill_rss_mb")


def run_child(code: Path, mode: str) -> dict:
    src = CHILD.replace("CODE", repr(str(code))).replace("MODE", repr(mode))
    r = subprocess.run([sys.executable, "-c", src], capture_output=True,
                       text=True, timeout=600, cwd=str(code))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"child for {code} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    add_code_flag(ap)
    ap.add_argument("--out", default=str(HERE / "results" / "kv_first_touch.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from millis.common.hardware import cpu_flags, describe

    systems = {"here": ROOT, **checkouts(ap, a.code)}
    for code in systems.values():  # builds each checkout's kernels before anything is timed
        run_child(code, "first")
    # the first steps in one phase, the waves in the next: a process started just after one that held a
    # lot of memory finds it cheap to fault in (this VM: the first step ~40 ms after a wave's exit against
    # 150-300 after a short run's), so a wave before a first step would decide its figure
    runs: dict[str, list[dict]] = {n: [] for n in systems}
    for mode in ("first", "fill"):
        for r in range(a.rounds):
            for i, (name, code) in enumerate(systems.items() if r % 2 == 0 else reversed(systems.items())):
                res = run_child(code, mode)
                if mode == "first":
                    runs[name].append(res)
                else:
                    runs[name][r].update(res)
                print(f"{mode} round {r} {name}: " + " ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
    table = {n: {k: round(statistics.median(x[k] for x in rs), 2) for k in KEYS} for n, rs in runs.items()}
    print(f"\n{'system':<10}" + "".join(f"{k:>16}" for k in KEYS))
    for n, row in table.items():
        print(f"{n:<10}" + "".join(f"{row[k]:>16.1f}" for k in KEYS))
    out = {"bench": "kv_first_touch", "model": "builtin:smollm2", "threads": 2, "rounds": a.rounds,
           "medians": table, "runs": runs, "machine": describe(), "cpu_flags": sorted(cpu_flags()),
           "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    write_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

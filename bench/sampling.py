"""What sampling costs a decode step: SmolLM2-135M (the embedded GGUF) on millis's native engine, ms per step
at 1 / 4 / 16 rows, greedy against OpenAI's default (temperature 1, top_p 1) and a nucleus (t 0.7, top_p 0.9),
for this tree and, with --before DIR, a checkout of an earlier commit, each tree in a process of its own,
the trees alternated round by round.

    .venv/bin/python bench/sampling.py --before /tmp/old-checkout --out bench/results/sampling_zen4.json

Prints a table (median ms/step over rounds, tokens/s, and this tree over the other, the median of per-round
ratios) and writes the JSON with the CPU it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = (1, 4, 16)
MODES = {"greedy": {}, "t=1": {"temperature": 1.0}, "t=0.7,top_p=0.9": {"temperature": 0.7, "top_p": 0.9}}


def child(threads: int, tokens: int) -> dict:
    """In the tree on PYTHONPATH: ms per decode step per (rows, mode)."""
    from millis.gen import EngineConfig, SamplingParams, open_engine

    # every row prefilled in the untimed first step (4 a step by default: the rest were prefilled in the timed
    # ones, and the first and last steps decoded 4, 8, 12 of 16 rows)
    eng = open_engine("builtin:smollm2", EngineConfig(max_batch=max(ROWS), threads=threads, kv_memory_mb=128,
                                                      max_prefills_per_step=max(ROWS)))
    out = {}
    for rows in ROWS:
        for mode, kw in MODES.items():
            params = SamplingParams(max_tokens=tokens, ignore_eos=True, seed=1, **kw)
            for i in range(rows):
                eng.add(f"Once upon a time there was a {i}", params)
            eng.step()  # the prefills
            assert not eng.waiting, "a row was not prefilled in the untimed step"
            t0, steps = time.perf_counter(), 0
            while eng.has_work:
                eng.step()
                steps += 1
            out[f"{rows}/{mode}"] = (time.perf_counter() - t0) / steps * 1e3
    return out


def run_tree(tree: Path, threads: int, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, __file__, "--child", "--threads", str(threads), "--tokens", str(tokens)],
                       env=env, capture_output=True, text=True, cwd=tree, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="", help="a checkout of an earlier commit to run beside this tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=40, help="tokens each request decodes")
    ap.add_argument("--out", default="bench/results/sampling.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.threads, a.tokens)))
        return
    from millis.common.hardware import describe

    trees = {"this": ROOT} | ({"before": Path(a.before).resolve()} if a.before else {})
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for i in range(a.rounds):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):  # alternated
            runs[name].append(run_tree(trees[name], a.threads, a.tokens))
    keys = list(runs["this"][0])
    rows = []
    print(f"{'rows/mode':<22} " + " ".join(f"{k + ' ms':>12} {k + ' tok/s':>12}" for k in trees) +
          ("  this/before (rounds)" if a.before else ""))
    for key in keys:
        row = {"case": key}
        for name in trees:
            ms = statistics.median(r[key] for r in runs[name])
            row[name] = {"ms_per_step": ms, "tokens_per_s": int(key.split("/")[0]) / ms * 1e3,
                         "rounds": [r[key] for r in runs[name]]}
        line = f"{key:<22} " + " ".join(f"{row[n]['ms_per_step']:>12.2f} {row[n]['tokens_per_s']:>12.0f}" for n in trees)
        if a.before:
            ratios = [t[key] / b[key] for t, b in zip(runs["this"], runs["before"])]
            row["this_over_before"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            line += f"  {row['this_over_before']['median']:.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
        print(line)
        rows.append(row)
    out = {"bench": "sampling", "machine": describe(), "threads": a.threads, "tokens": a.tokens, "rounds": a.rounds,
           "before": a.before, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

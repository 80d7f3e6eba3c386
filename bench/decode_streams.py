"""How millis's native decode should read its weights on this CPU: the real GGUF files decoded with each of
kernels/packed.c's decode_streams modes and decode_prefetch distances, alternated in one process, so a new CPU's
rules are one run away.

    .venv/bin/python bench/decode_streams.py [--files llama1b-q4_0,smollm2-f32] [--rounds 5] [--steps 32]
                                             [--prefetch 0,1024]

Modes (kernels/blockq.h READ_*): one (a group of 8 rows after another: one stream per thread), quad (AVX-512 Q8_0 /
F32: four adjacent groups), spread (a chunk's rows in four runs read side by side), each with the software prefetch
distance in force here; then "one pfN": one, with the kernels prefetching N bytes ahead of each stream (0: no
software prefetch, the hardware prefetchers alone), for each --prefetch distance other than the rule's. Per round
every mode runs
`steps` greedy-free decode steps (the same token each step) after a 16-token prompt at 2 threads; ms is the
median step, ratio the median over rounds of mode / one (< 1: faster than one). The modes give the same
bytes: the last logits of every mode are compared. Files are bench/generation_gguf.py's (built on first use).
Writes bench/results/decode_streams.json (--out), with the CPU, its ISA and the rule in force.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from generation_gguf import build_files  # noqa: E402

STREAMS = {"one": 1, "quad": 4, "spread": 8}  # kernels/blockq.h READ_ONE, READ_QUAD, READ_SPREAD


def run_file(path: str, rounds: int, steps: int, threads: int, prefetch: list[int]) -> dict:
    from millis.gen import EngineConfig, open_engine

    m = open_engine(path, EngineConfig(max_batch=1, max_seq=1024, threads=threads)).model
    lib = m.lib
    for f in (lib.decode_streams, lib.decode_prefetch):
        f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int]
    default, default_pf = lib.decode_streams(0), lib.decode_prefetch(-1)
    MODES = {k: (v, default_pf) for k, v in STREAMS.items()}  # name -> (streams, prefetch bytes)
    MODES.update({f"one pf{d}": (STREAMS["one"], d) for d in prefetch if d != default_pf})
    ms: dict[str, list[float]] = {k: [] for k in MODES}
    last: dict[str, np.ndarray] = {}
    i32 = lambda *v: np.array(v, np.int32)  # noqa: E731
    try:
        for r in range(rounds):
            names = list(MODES)[r % len(MODES):] + list(MODES)[:r % len(MODES)]  # order rotated by round
            for name in names:
                lib.decode_streams(MODES[name][0])
                lib.decode_prefetch(MODES[name][1])
                m.kv.reserve(0, 16 + steps)
                p = np.arange(16, dtype=np.int32)
                m.forward_flat(p, p, np.zeros(16, np.int32), i32(15))
                t = []
                for i in range(steps):
                    t0 = time.perf_counter()
                    out = m.forward_flat(i32(3), i32(16 + i), i32(0), i32(0))
                    t.append(time.perf_counter() - t0)
                m.kv.release(0)
                ms[name].append(1e3 * float(np.median(t)))
                last[name] = out.copy()
    finally:
        lib.decode_streams(default)
        lib.decode_prefetch(default_pf)
    one = np.asarray(ms["one"])
    rows = {name: {"ms": round(float(np.median(v)), 3), "ratio": round(float(np.median(np.asarray(v) / one)), 3),
                   "ratio_min": round(float(np.min(np.asarray(v) / one)), 3),
                   "ratio_max": round(float(np.max(np.asarray(v) / one)), 3), "rounds_ms": [round(x, 3) for x in v]}
            for name, v in ms.items()}
    same = all(np.array_equal(last["one"], v) for v in last.values())
    rule = next(k for k, v in STREAMS.items() if v == default)
    return {"modes": rows, "same_logits": same, "rule": rule, "rule_prefetch": default_pf, "isa": m.isa}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default="llama1b-q4_0,llama1b-q8_0,smollm2-f32,smollm2-q4_k_m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefetch", default="0,1024", help="software prefetch distances (bytes) tried beside the rule's")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_streams.json"))
    a = ap.parse_args()
    from millis.common.hardware import describe

    files = build_files(a.files.split(","), a.threads)
    out = {"machine": describe(), "threads": a.threads, "rounds": a.rounds, "steps": a.steps,
           "command": "bench/decode_streams.py " + " ".join(sys.argv[1:]), "files": {}}
    for name in a.files.split(","):
        out["files"][name] = res = run_file(files[name], a.rounds, a.steps, a.threads,
                                            [int(d) for d in a.prefetch.split(",") if d])
        cells = "  ".join(f"{k} {v['ms']:7.2f} ms x{v['ratio']:.3f} [{v['ratio_min']:.2f}-{v['ratio_max']:.2f}]"
                          for k, v in res["modes"].items())
        print(f"{name:16} {cells}  same logits {res['same_logits']}  rule here: {res['rule']}, prefetch "
              f"{res['rule_prefetch']}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['machine'].get('cpu')} ({', '.join(out['machine'].get('isa', []))}); wrote {a.out}")


if __name__ == "__main__":
    main()

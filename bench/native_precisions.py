"""millis's native encoder precisions against each other, in one process, alternated (an A/B bench).

    .venv/bin/python bench/native_precisions.py [--models minilm,bge-small,bert-base]
        [--precisions int7,int7-a7] [--shapes b1xs16,b1xs128] [--rounds 7] [--out FILE]

MILLIS_KERNEL_ISA=avx2 times another build the CPU runs (kernels/native.py); a precision named with "-att8"
(int7-row-att8) runs with the int8 attention.

Cross-process benches (bench/cpu_encoders.py) put each system in its own process and see the machine's
load move between cells; a kernel change that is worth 5-10% needs a tighter comparison. Here every
precision of one model is loaded in this process (the same weights, the same C build), and each round
times every precision back to back at each shape on the same random ids (timing order rotated per
round). The ratio of a precision is the median over rounds of (its round median / the first
precision's round median), with the range across rounds. Encodes all of the padding-free forward plus
the task head (mean pooling + normalisation), as NativeBert.__call__ runs it.
Writes bench/results/native_precisions.json (`rows`: model, shape, precision, p50_ms, ratio, ratio_min,
ratio_max; `meta`: CPU, ISA, the kernels' build) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent))
import models  # noqa: E402


ATT8 = "-att8"  # a precision with this suffix runs the int8 attention (as the variant native-int7-row-att8)


def time_model(model: str, precisions: list[str], shapes: list[tuple[int, int]], rounds: int,
               threads: int) -> list[dict]:
    from millis.encoder.native import NativeBert
    from millis.encoder.source import Pooling
    from millis.gpu.encoder import RunOptions, from_hf

    enc = from_hf(Path(models.encoder_dir(model)), "embed", Pooling(mode="mean", normalize=True),
                  RunOptions(dtype="fp32", fuse="torch", device="cpu"))
    runs = {p: NativeBert(enc, p.removesuffix(ATT8), threads, attention="int8" if p.endswith(ATT8) else "auto")
            for p in precisions}
    rng = np.random.default_rng(0)
    rows = []
    for B, T in shapes:
        ids = rng.integers(1000, 20000, (B, T))
        mask = np.ones((B, T), np.int64)
        n = max(3, 1000 // (B * T))  # calls per precision per round
        per_round: dict[str, list[float]] = {p: [] for p in precisions}
        for r in range(rounds):
            order = precisions[r % len(precisions):] + precisions[:r % len(precisions)]
            for p in order:
                runs[p](ids, mask)  # warm: its weights back in cache
                ms = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    runs[p](ids, mask)
                    ms.append((time.perf_counter() - t0) * 1e3)
                per_round[p].append(float(np.median(ms)))
        base = np.asarray(per_round[precisions[0]])
        for p in precisions:
            ratios = np.asarray(per_round[p]) / base
            rows.append({"model": model, "shape": f"b{B}xs{T}", "precision": p,
                         "p50_ms": float(np.median(per_round[p])), "ratio": float(np.median(ratios)),
                         "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
                         "round_ms": per_round[p]})
            print(f"{model:9} b{B}xs{T:<5} {p:14} {rows[-1]['p50_ms']:9.3f} ms  x{rows[-1]['ratio']:.3f} "
                  f"[{rows[-1]['ratio_min']:.2f}-{rows[-1]['ratio_max']:.2f}]", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bge-small,bert-base")
    ap.add_argument("--precisions", default="int7,int7-a7",
                    help=f"the first is the baseline of the ratios; a precision + {ATT8}: with the int8 attention")
    ap.add_argument("--shapes", default="b1xs16,b1xs128")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "native_precisions.json"))
    a = ap.parse_args()
    from millis.common import hardware
    from millis.encoder.native import PRECISIONS
    from millis.kernels.native import native_isa

    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    if not precisions or {p.removesuffix(ATT8) for p in precisions} - set(PRECISIONS):
        raise SystemExit(f"--precisions: choose from {', '.join(PRECISIONS)}, each with or without {ATT8}")
    shapes = [tuple(int(x) for x in s.strip().replace("b", "").replace("s", "").split("x"))
              for s in a.shapes.split(",")]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware.describe(), "kernels": native_isa(),
            "settings": {k: v for k, v in vars(a).items() if k != "out"}}
    rows = []
    for model in a.models.split(","):
        rows += time_model(model.strip(), precisions, shapes, a.rounds, a.threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""millis's native encoder at an earlier commit against this tree, process by process, alternated (an A/B bench
across code versions).

    .venv/bin/python bench/native_revisions.py --base c6648d9 [--models bge-small,bert-base]
        [--precisions int7-row,int7-row-att8] [--shapes b1xs16,b1xs128,b8xs128] [--rounds 5] [--out FILE]

What a figure measured on another CPU against the peers would be with today's code, where that CPU is not at
hand: on one machine, the same weights and shapes through `NativeBert` of the base commit (`git archive` into
bench/.cache/revisions/<commit>, a checkout such as bench/checkouts.py's --code takes) and of this tree, each
call in a fresh process (each tree imports its own `millis` and builds its own kernels), the two trees back to
back in every round, base first. The ratio is the
median over rounds of (this tree's p50 / the base's p50 at the same precision), with its range. A precision
named with "-att8" runs this tree with the int8 attention against the base's plain precision (its attention
as it was then). MILLIS_KERNEL_ISA=avx2 times the build an AVX2-only CPU (Zen 3) runs, on this CPU's pipes.
Writes JSON (`rows`: model, shape, precision, base / head p50 per round, ratio, range; `meta`: CPU, ISA, the
kernels' build, both commits) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATT8 = "-att8"


def worker(tree: str, model_dir: str, precision: str, B: int, T: int, n: int, threads: int) -> None:
    """In a fresh process: `tree`'s NativeBert at `precision` on B x T random ids; prints the p50 in ms."""
    sys.path.insert(0, tree)
    import numpy as np
    from millis.encoder.native import NativeBert
    from millis.encoder.source import Pooling
    from millis.gpu.encoder import RunOptions, from_hf

    enc = from_hf(Path(model_dir), "embed", Pooling(mode="mean", normalize=True),
                  RunOptions(dtype="fp32", fuse="torch", device="cpu"))
    kw = {"attention": "int8"} if precision.endswith(ATT8) else {}
    nb = NativeBert(enc, precision.removesuffix(ATT8), threads, **kw)
    ids = np.random.default_rng(0).integers(1000, 20000, (B, T))
    mask = np.ones((B, T), np.int64)
    for _ in range(3):
        nb(ids, mask)
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        nb(ids, mask)
        ms.append((time.perf_counter() - t0) * 1e3)
    print(f"p50 {float(np.median(ms)):.4f}")


def base_tree(commit: str) -> Path:
    full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
    tree = HERE / ".cache" / "revisions" / full
    if not (tree / "millis").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", full], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def one_run(tree: Path, model_dir: str, precision: str, B: int, T: int, threads: int) -> float:
    n = max(4, 640 // (B * T))
    out = subprocess.run([sys.executable, __file__, "--worker", str(tree), model_dir, precision, str(B), str(T), str(n),
                          str(threads)], capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("p50 ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{tree.name} {precision} b{B}xs{T} failed: {out.stderr.strip()[-600:]}")
    return float(lines[-1].split()[1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tree, model_dir, precision, B, T, n, threads = sys.argv[2:9]
        worker(tree, model_dir, precision, int(B), int(T), int(n), int(threads))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the earlier commit (its NativeBert must take these precisions)")
    ap.add_argument("--models", default="bge-small,bert-base")
    ap.add_argument("--precisions", default="int7-row", help=f"each with or without {ATT8} (this tree only)")
    ap.add_argument("--shapes", default="b1xs16,b1xs128,b8xs128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "native_revisions.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE / "peers"))
    import models
    import numpy as np
    from checkouts import write_result

    from millis.common import hardware
    from millis.kernels.native import native_isa

    shapes = [tuple(int(x) for x in s.strip().replace("b", "").replace("s", "").split("x"))
              for s in a.shapes.split(",")]
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    base = base_tree(a.base)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware.describe(), "kernels": native_isa(),
            "base": base.name, "head": head, "head_dirty": dirty,
            "settings": {k: v for k, v in vars(a).items() if k != "out"}}
    print(f"{hardware.cpu_model()}, kernels {native_isa()}; base {base.name[:9]}, this tree {head[:9]}"
          f"{' (uncommitted changes)' if dirty else ''}")
    print(f"{'model':10} {'shape':8} {'precision':16} {'base ms':>8} {'this ms':>8} {'ratio':>6} range")
    rows = []
    for model in (m.strip() for m in a.models.split(",")):
        model_dir = str(models.encoder_dir(model))
        for B, T in shapes:
            for p in precisions:
                base_ms, head_ms = [], []
                for _ in range(a.rounds):
                    base_ms.append(one_run(base, model_dir, p.removesuffix(ATT8), B, T, a.threads))
                    head_ms.append(one_run(ROOT, model_dir, p, B, T, a.threads))
                ratios = np.asarray(head_ms) / np.asarray(base_ms)
                row = {"model": model, "shape": f"b{B}xs{T}", "precision": p, "base_ms": base_ms, "head_ms": head_ms,
                       "base_p50_ms": float(np.median(base_ms)), "head_p50_ms": float(np.median(head_ms)),
                       "ratio": float(np.median(ratios)), "ratio_min": float(ratios.min()),
                       "ratio_max": float(ratios.max())}
                rows.append(row)
                print(f"{model:10} {row['shape']:8} {p:16} {row['base_p50_ms']:8.2f} {row['head_p50_ms']:8.2f} "
                      f"{row['ratio']:6.3f} [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]", flush=True)
    write_result(a.out, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

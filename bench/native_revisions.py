"""millis's native encoder at an earlier commit against this tree, process by process, alternated (an A/B bench
across code versions).

    .venv/bin/python bench/native_revisions.py --base c6648d9 [--models bge-small,bert-base]
        [--precisions int7-row,int7-row-att8] [--shapes b1xs16,b1xs128,b8xs128] [--rounds 5] [--out FILE]

What a figure measured on another CPU against the peers would be with today's code, where that CPU is not at
hand: on one machine, the same weights and shapes through `NativeBert` of the base commit (`git archive` into
bench/.cache/revisions/<commit>, a checkout such as bench/checkouts.py's --code takes) and of this tree, each
call in a fresh process (each tree imports its own `millis` and builds its own kernels), the two trees back to
back in every round, in ABBA order (base first in even rounds, this tree first in odd ones: neither always runs
after the other). Each process times max(8, --tokens / (b x s)) calls after 3 warm-up ones (2048 tokens: 128
calls at b1xs16, 16 at b1xs128, 8 at b8xs128, against 40 / 5 / 4 before; a process's start, ~2 s, still
dominates its time). The ratio is the
median over rounds of (this tree's p50 / the base's p50 at the same precision), with its range. A precision
named with "-att8" runs this tree with the int8 attention against the base's plain precision (its attention
as it was then); with --base-attention both trees run the int8 attention (a regression check of a base that has
it). MILLIS_KERNEL_ISA=avx2 times the build an AVX2-only CPU (Zen 3) runs, on this CPU's pipes.
Writes JSON after each cell (`rows`: model, shape, precision, base / head p50 per round (rounds where both ran),
ratio, range, calls per process; a process that failed is in the row's `failures` (round, tree, error) and its
round in no ratio: one failure does not end the run; `meta`: CPU, ISA, the kernels' build, both commits) and
prints a table.
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


def calls(B: int, T: int, tokens: int) -> int:
    """Timed calls per process at b x s."""
    return max(8, tokens // (B * T))


def one_run(tree: Path, model_dir: str, precision: str, B: int, T: int, threads: int, n: int) -> float:
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
    ap.add_argument("--base-attention", action="store_true",
                    help=f"the base runs {ATT8} precisions with the int8 attention too (it must have it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048,
                    help="timed tokens per process: max(8, tokens / (b x s)) calls (before: max(4, 640 / (b x s)))")
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
            "base": base.name, "head": head, "head_dirty": dirty, "order": "ABBA (base first in even rounds)",
            "settings": {k: v for k, v in vars(a).items() if k != "out"}}
    print(f"{hardware.cpu_model()}, kernels {native_isa()}; base {base.name[:9]}, this tree {head[:9]}"
          f"{' (uncommitted changes)' if dirty else ''}")
    print(f"{'model':10} {'shape':8} {'precision':16} {'base ms':>8} {'this ms':>8} {'ratio':>6} range")
    rows = []
    for model in (m.strip() for m in a.models.split(",")):
        model_dir = str(models.encoder_dir(model))
        for B, T in shapes:
            for p in precisions:
                n = calls(B, T, a.tokens)
                base_ms, head_ms, orders, failures = [], [], [], []
                for r in range(a.rounds):
                    runs = [("base", base, p if a.base_attention else p.removesuffix(ATT8)), ("head", ROOT, p)]
                    got = {}
                    for label, tree, prec in (runs if r % 2 == 0 else runs[::-1]):  # ABBA
                        try:
                            got[label] = one_run(tree, model_dir, prec, B, T, a.threads, n)
                        except RuntimeError as e:
                            failures.append({"round": r, "tree": label, "error": str(e)})
                            print(f"  FAILED round {r + 1}: {e}", flush=True)
                    if len(got) == 2:  # a round pairs only when both trees ran
                        base_ms.append(got["base"])
                        head_ms.append(got["head"])
                        orders.append("base,head" if r % 2 == 0 else "head,base")
                row = {"model": model, "shape": f"b{B}xs{T}", "precision": p, "base_ms": base_ms, "head_ms": head_ms,
                       "order": orders, "calls_per_process": n, "rounds_ok": len(base_ms), "rounds_asked": a.rounds}
                if base_ms:
                    ratios = np.asarray(head_ms) / np.asarray(base_ms)
                    row.update(base_p50_ms=float(np.median(base_ms)), head_p50_ms=float(np.median(head_ms)),
                               ratio=float(np.median(ratios)), ratio_min=float(ratios.min()),
                               ratio_max=float(ratios.max()))
                    print(f"{model:10} {row['shape']:8} {p:16} {row['base_p50_ms']:8.2f} {row['head_p50_ms']:8.2f} "
                          f"{row['ratio']:6.3f} [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]"
                          + (f"  ({len(base_ms)} of {a.rounds} rounds)" if len(base_ms) < a.rounds else ""), flush=True)
                else:
                    row.update(base_p50_ms=None, head_p50_ms=None, ratio=None, ratio_min=None, ratio_max=None)
                    print(f"{model:10} {row['shape']:8} {p:16} no round ran on both trees", flush=True)
                if failures:
                    row["failures"] = failures
                rows.append(row)
                write_result(a.out, {"meta": meta, "rows": rows}, quiet=True)  # a later failure loses nothing
    write_result(a.out, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

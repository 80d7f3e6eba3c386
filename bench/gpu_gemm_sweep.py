"""Sweep bench/gpu_research/gemm.py's block configs at the encoder's GEMM shapes against cuBLAS (on the GPU).

    PYTHONPATH=. python3 bench/gpu_gemm_sweep.py [--out DIR]

For each model width, token count M and GEMM of a layer (attention output and FFN-out as split-K
partials, FFN-in with bias + GELU in the epilogue), times gemm.py's default `pick`, every config of a
small grid, and the cuBLAS path it replaces (the GEMM, plus the bias+GELU kernel for FFN-in), each
from replays of a CUDA graph of 20 calls. Writes gemm_sweep.json; prints the best per shape.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_probes import graph_time_us  # noqa: E402
from gpu_research import gemm  # noqa: E402
from millis.gpu import kernels  # noqa: E402

WIDTHS = {"bert-base": (768, 3072), "minilm": (384, 1536)}


def candidates(M: int, N: int, K: int, split: bool):
    for bm, bn, stages, warps in itertools.product((16, 32, 64, 128), (32, 64, 128), (3, 4), (4, 8)):
        if bm > max(16, 2 * M) or (warps == 8 and bm * bn < 64 * 128):
            continue
        tiles = -(-M // bm) * -(-N // bn)
        splits = [s for s in range(1, K // 64 + 1) if K % (s * 64) == 0 and 48 <= tiles * s <= 528] if split else [1]
        for s in splits or [1]:
            yield gemm.GemmConfig(bm, bn, 64, s, warps, stages)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ms", default="16,128,512")
    a = ap.parse_args()
    rows = []
    for model, (H, I) in WIDTHS.items():
        for M in (int(m) for m in a.ms.split(",")):
            for name, (N, K), split in (("attn-out", (H, H), True), ("ffn-in+gelu", (I, H), False),
                                        ("ffn-out", (H, I), True)):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5
                b = torch.randn(N, device="cuda", dtype=torch.float16)
                if split:
                    def run(cfg):
                        return gemm.linear_partials(x, w, cfg)
                    cublas = graph_time_us(lambda: torch.nn.functional.linear(x, w))
                else:
                    def run(cfg):
                        return gemm.linear_gelu(x, w, b, cfg)
                    cublas = graph_time_us(lambda: kernels.bias_gelu(torch.nn.functional.linear(x, w), b))
                default = gemm.pick(M, N, K, split)
                timed = []
                for cfg in [default, *candidates(M, N, K, split)]:
                    try:
                        timed.append((graph_time_us(lambda: run(cfg)), cfg))
                    except Exception as e:  # a config Triton cannot build (shared memory...)
                        print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                best_us, best = min(timed, key=lambda t: t[0])
                row = {"model": model, "M": M, "gemm": name, "N": N, "K": K, "cublas_us": round(cublas, 2),
                       "default_us": round(timed[0][0], 2), "default": default.__dict__,
                       "best_us": round(best_us, 2), "best": best.__dict__,
                       "top5": [(round(t, 2), c.__dict__) for t, c in sorted(timed, key=lambda t: t[0])[:5]]}
                rows.append(row)
                print(f"{model:9s} M={M:4d} {name:12s} cublas {cublas:6.2f}  default {timed[0][0]:6.2f}  "
                      f"best {best_us:6.2f} {best}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gemm_sweep.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

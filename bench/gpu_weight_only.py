"""Weight-only decode on a GPU (issue 20): the Llama-3.2-1B-shaped model in bf16, int8, int4 and fp8
(millis.gpu.weight_only), and each of its matmul shapes against cuBLAS bf16. Run on the device from the
repo root, after bench/peers/models.decoder_dir('llama-1b') has written the random weights:

    PYTHONPATH=. python3 bench/gpu_weight_only.py --out $OUT

- decode (first: the targets): per format, the engine (`open_engine`, CUDA graphs) at b1 and b8, the median
  step in ms, the weight bytes a step reads and the GB/s that makes, the kernel each matmul shape was tuned
  to; cold start (load, quantize, tune, capture) apart;
- matmuls: for each (N, K) of a decode step and M in 1 / 8 / 32 rows, the median time of one call (calls
  captured in a CUDA graph and replayed, so no launch overhead) and the weight GB/s it reaches, for cuBLAS
  bf16 and each format at the kernel `weight_only_kernels.tune` picks, with every candidate's time.
`--device cpu` is a smoke run of the script itself (a tiny random model, the torch path, no timings that mean
anything). Writes $OUT/gpu_weight_only_<gpu>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

FORMATS = ("bf16", "int8", "int4", "fp8")
ROWS = (1, 8, 32)
TARGETS_MS = {"bf16": 0.75, "int8": 0.5, "int4": 0.35}  # Llama-1B b1 decode on an H200


def emit(rows: list[dict], row: dict) -> None:
    """Keep a row and print it as a JSON line: the log keeps every figure if the part's time box ends the run."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def matmul_rows(shapes: list[tuple[int, int]]) -> list[dict]:
    """Each matmul shape at 1 / 8 / 32 rows: cuBLAS bf16, and each format at the kernel `tune` picks (every
    candidate's time kept beside it)."""
    import torch
    import torch.nn.functional as F

    from millis.gpu import weight_only as wo
    from millis.gpu.graph_timing import graph_us
    from millis.gpu.weight_only_kernels import TUNED, tune, tune_key

    TUNED.clear()  # the decode part tuned some of these shapes: measure every candidate again, for the record
    rows = []
    for n, k in shapes:
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in ROWS}
        base = {m: graph_us(lambda: F.linear(xs[m], lin.weight)) for m in ROWS}
        for f in wo.FORMATS:
            mod = wo.WeightOnlyLinear(lin, f)
            timed = tune([mod], rows=(1, 16, 32))
            for m in ROWS:
                x, key = xs[m], tune_key(f, n, k, m)
                us = graph_us(lambda: mod.matmul(x, TUNED.get(key)))
                emit(rows, {"N": n, "K": k, "M": m, "system": f, "config": TUNED.get(key), "us": round(us, 2),
                            "GBps": round(wo.packed_bytes(mod) / us / 1e3, 1), "cublas_bf16_us": round(base[m], 2),
                            "cublas_GBps": round(n * k * 2 / base[m] / 1e3, 1), "vs_cublas": round(us / base[m], 3),
                            "candidates_us": [[c, round(t, 2)] for c, t in timed.get(key, [])]})
        print(f"matmul N{n} K{k}: done", flush=True)
    return rows


def decode_rows(model_dir: str, device: str, new_tokens: int, save=lambda rows: None) -> list[dict]:
    """Each format's row; `save(rows so far)` after each (a time box that ends in the last format keeps the rest)."""
    import torch

    out = []
    for f in FORMATS:
        try:
            emit(out, decode_row(model_dir, device, new_tokens, f))
        except Exception as e:  # noqa: BLE001 -- one format's failure is its row; the others still run
            emit(out, {"format": f, "error": f"{type(e).__name__}: {e}"[:500]})
        save(out)
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def decode_row(model_dir: str, device: str, new_tokens: int, f: str) -> dict:
    """One format through the engine: b1 / b8 decode, TTFT, the weight bytes a step reads, cold start."""
    import torch

    from millis.gen import EngineConfig, open_engine
    from millis.gpu.weight_only import WeightOnlyLinear, packed_bytes, quantize_weight_only
    from millis.gpu.weight_only_kernels import TUNED
    from gpu_decode import decode_figures, kernels_per_step, safe_step_profile

    quant = "none" if f == "bf16" else f
    t0 = time.perf_counter()
    if device == "cuda":
        eng = open_engine(model_dir, EngineConfig(max_batch=8, max_seq=1024, dtype="bf16", quant=quant,
                                                  device="cuda", max_prefills_per_step=8))
        torch.cuda.synchronize()
    else:  # smoke: the torch model on the CPU, quantized in place (the engine refuses weight-only on cpu)
        os.environ["MILLIS_NO_KERNELS"] = "1"
        eng = open_engine(model_dir, EngineConfig(max_batch=8, max_seq=1024, dtype="bf16"))
        if quant != "none":
            quantize_weight_only(eng.model, quant)
    cold = time.perf_counter() - t0
    weights = sum(packed_bytes(m) if isinstance(m, WeightOnlyLinear) else m.weight.numel() * 2
                  for m in eng.model.modules() if isinstance(m, (WeightOnlyLinear, torch.nn.Linear)))
    cuda = device == "cuda"
    row = {"format": f, **decode_figures(eng, list(range(100, 116)), new_tokens), "weight_bytes": weights,
           "cold_start_s": round(cold, 2), "kernels_per_decode_step": kernels_per_step(eng) if cuda else None,
           "fused_decode": bool(cuda and eng.decode.fused)}
    row["b1_weight_GBps"] = round(weights / row["b1_ms_per_token"] / 1e6, 1)
    if cuda:  # where the batch-1 step's time goes: each kernel's device time, and the launch gaps left over
        from millis.gpu import decode_kernels as dk

        row["pdl"] = row["fused_decode"] and dk.pdl(eng.model.tok_emb.weight)  # programmatic dependent launch
        row["per_layer"] = bool(row["fused_decode"] and eng.decode.per_layer)  # one kernel a layer at b1
        row["layer_us"] = eng.decode.layer_us  # all layers in one kernel each and in five: the engine keeps the faster
        row["step_profile"] = safe_step_profile(eng)
    row["tuned"] = {f"{n}x{k} rows<={r}": c for (fmt, n, k, r), c in TUNED.items() if fmt == quant}
    if f in TARGETS_MS:
        row["target_ms"] = TARGETS_MS[f]
        row["target_met"] = row["b1_ms_per_token"] <= TARGETS_MS[f]
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", help="cuda; cpu: a smoke run of the script (tiny model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-matmuls", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    a = ap.parse_args()
    import torch

    from gpu_probes import cuda_or_smoke, gpu_slug
    import models

    cuda = cuda_or_smoke(a.device)
    if cuda is None:
        return 2
    model_dir = models.decoder_dir("llama-1b" if cuda else "llama-tiny")
    d, ff, kv, vocab = 2048, 8192, 512, 128256  # Llama-3.2-1B: hidden, intermediate, k (or v) width, vocabulary
    res = {"bench": "gpu_weight_only", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
           "torch": torch.__version__,
           "model": "llama-3.2-1b shape, random weights" if cuda else "tiny", "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_weight_only_{gpu_slug(res['device'])}.json"
    res["triton"] = getattr(sys.modules.get("triton"), "__version__", None)

    def save(rows: list[dict]) -> None:
        path.write_text(json.dumps({**res, "decode": rows}, indent=1) + "\n")
    res["decode"] = decode_rows(model_dir, a.device, a.new_tokens, save)  # the targets first
    res["triton"] = getattr(sys.modules.get("triton"), "__version__", None)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'format':7} {'b1 ms/tok':>10} {'GB/s':>8} {'b8 tok/s':>10} {'TTFT512':>8} {'kernels':>8} {'target':>7}")
    for r in res["decode"]:
        if "error" in r:
            print(f"{r['format']:7} {r['error']}")
            continue
        print(f"{r['format']:7} {r['b1_ms_per_token']:10.4f} {r['b1_weight_GBps']:8.1f} {r['b8_tokens_per_s']:10.1f} "
              f"{r['ttft_512_ms']:8.2f} {str(r['kernels_per_decode_step']):>8} {str(r.get('target_met', '')):>7}")
    if cuda and not a.no_matmuls:
        shapes = [(d + 2 * kv, d), (d, d), (2 * ff, d), (d, ff), (vocab, d)]  # wqkv, wo, w13, w2, head
        res["matmuls"] = matmul_rows(shapes)
        path.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

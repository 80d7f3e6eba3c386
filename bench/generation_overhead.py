"""Per-token overhead of millis's native decoder: ms/token of a 30-layer Llama at a tiny width (64) against
the real SmolLM2-135M width (576), same layer count and formats, random weights; and where the real
model's step goes, per op (the C forward's own profile, `llm_profile`).

    .venv/bin/python bench/generation_overhead.py [--threads 2] [--tokens 200]

The tiny model's time is what a step costs beyond its arithmetic: pool jobs, norms, RoPE, the Python
call. Writes bench/results/generation_overhead.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from millis.common.hardware import describe
from millis.gen.config import LlamaConfig
from millis.gen.models.native_llama import NativeLlama

OPS = "embed norm qkv rope attn quant o ffn_up swiglu down head".split()  # llama_step.c's profile order
SHAPES = {"tiny-30x64": dict(dim=64, hidden_dim=128, n_heads=2, n_kv_heads=1, vocab_size=256),
          "smollm2-30x576": dict(dim=576, hidden_dim=1536, n_heads=9, n_kv_heads=3, vocab_size=49152)}


def model(shape: dict, qtype: str, threads: int) -> NativeLlama:
    c = LlamaConfig(n_layers=30, max_seq=1024, norm_eps=1e-5, **shape)
    rng = np.random.default_rng(0)

    def mat(rows: int, cols: int, q: str = qtype):
        w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        return SimpleNamespace(qtype=q, shape=(rows, cols), data=np.ascontiguousarray(
            quantize(w, GGMLQuantizationType[q])))

    ones = lambda n: SimpleNamespace(qtype="F32", shape=(n,), data=np.ones(n, np.float32))  # noqa: E731
    hd = c.dim // c.n_heads
    t = {"token_embd.weight": mat(c.vocab_size, c.dim, "Q8_0"), "output_norm.weight": ones(c.dim)}
    for i in range(c.n_layers):
        b = f"blk.{i}."
        t.update({b + "attn_q.weight": mat(c.n_heads * hd, c.dim), b + "attn_k.weight": mat(c.n_kv_heads * hd, c.dim),
                  b + "attn_v.weight": mat(c.n_kv_heads * hd, c.dim), b + "attn_output.weight": mat(c.dim, c.dim),
                  b + "ffn_gate.weight": mat(c.hidden_dim, c.dim), b + "ffn_up.weight": mat(c.hidden_dim, c.dim),
                  b + "ffn_down.weight": mat(c.dim, c.hidden_dim), b + "attn_norm.weight": ones(c.dim),
                  b + "ffn_norm.weight": ones(c.dim)})
    return NativeLlama(c, t, False, 1, 1024, 64 << 20, threads)


def decode(m: NativeLlama, tokens: int) -> dict:
    """ms/token of `tokens` decode steps after a 16-token prompt, and ms/token per op."""
    m.kv.reserve(0, 16 + tokens)
    m.forward_flat(np.arange(16, dtype=np.int32), np.arange(16, dtype=np.int32), np.zeros(16, np.int32),
                   np.array([15], np.int32))
    prof = (ctypes.c_double * len(OPS))()
    m.lib.llm_profile(prof)  # reset
    times = []
    for i in range(tokens):
        t = time.perf_counter()
        m.forward_flat(np.array([3], np.int32), np.array([16 + i], np.int32), np.zeros(1, np.int32),
                       np.array([0], np.int32))
        times.append(time.perf_counter() - t)
    m.lib.llm_profile(prof)
    m.kv.release(0)
    return {"ms_per_token_median": 1e3 * float(np.median(times)), "ms_per_token_mean": 1e3 * float(np.mean(times)),
            "ops_ms_per_token": {k: 1e3 * v / tokens for k, v in zip(OPS, prof)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation_overhead.json"))
    a = ap.parse_args()
    rows = []
    for qtype in ("Q4_1", "Q8_0"):
        for name, shape in SHAPES.items():
            r = decode(model(shape, qtype, a.threads), a.tokens)
            rows.append({"shape": name, "qtype": qtype, "threads": a.threads, **r})
            ops = "  ".join(f"{k} {v:.2f}" for k, v in r["ops_ms_per_token"].items() if v >= 0.005)
            print(f"{name:16s} {qtype:5s} {r['ms_per_token_median']:7.2f} ms/token   {ops}")
    for q in ("Q4_1", "Q8_0"):
        tiny, real = (next(r for r in rows if r["shape"] == s and r["qtype"] == q) for s in SHAPES)
        print(f"{q}: overhead (30 layers at width 64) = {tiny['ms_per_token_median']:.2f} ms of "
              f"{real['ms_per_token_median']:.2f} ms/token at width 576 "
              f"({100 * tiny['ms_per_token_median'] / real['ms_per_token_median']:.1f}%)")
    out = {"machine": describe(), "rows": rows, "command": "bench/generation_overhead.py"}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

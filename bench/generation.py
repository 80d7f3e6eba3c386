"""Decode speed of millis.gen on this CPU: ms/token at batch 1 for each precision, on a random
GPT-2-124M-shaped model (the weights' values do not change the speed).

    .venv/bin/python bench/generation.py --steps 32 --threads 2

Variants: fp32, bf16, int8 (the engine's `quant=int8`: torch's dynamic quantization of every
Linear) and, for comparison, weight-only int8 through `torch._weight_int8pack_mm` with fp32
(`int8-wo`) and bf16 (`int8-wo-bf16`) activations. Each variant prefills a 16-token prompt, then decodes
`--steps` tokens through the engine; rounds alternate the variants. Beside ms/token: the weight
bytes read per token divided by the time (achieved bandwidth; decode at batch 1 reads every weight
once per token). Writes bench/results/generation.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.gen import SamplingParams  # noqa: E402
from millis.gen.config import EngineConfig, GPT2Config  # noqa: E402
from millis.gen.engine import Engine  # noqa: E402
from millis.gen.gpt2 import GPT2  # noqa: E402
from millis.gen.load import build  # noqa: E402

GPT2_124M = GPT2Config(vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq=1024, eos_id=50256)


class WeightOnlyInt8(torch.nn.Module):
    """int8 weights per output channel; the matmul dequantizes inside `_weight_int8pack_mm`."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # torch 2.13's bf16 kernel sums wrongly (or crashes) when `in` is not a multiple of 8
        assert q.shape[1] % 8 == 0
        self.weight, self.scale, self.bias = q, scale.to(lin.weight.dtype), lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def weight_only(model: torch.nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, WeightOnlyInt8(child))
        else:
            weight_only(child)


def engine(variant: str, sd: dict, max_seq: int) -> Engine:
    dtype = "bf16" if variant in ("bf16", "int8-wo-bf16") else "fp32"
    quant = "int8" if variant == "int8" else "none"
    loaded = build(GPT2_124M, dict(sd), None, "bench", EngineConfig(max_batch=1, max_seq=max_seq, dtype=dtype,
                                                                    quant=quant))
    if variant.startswith("int8-wo"):
        weight_only(loaded.model)
    return Engine(loaded)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every Linear's weight (the head included), not the embedding tables."""
    total = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Embedding) or w is None:
            continue
        w = w() if callable(w) else w  # dynamic-quantized Linear: weight() gives the packed qint8 tensor
        total += w.numel() * w.element_size()
    return total


def decode_ms(eng: Engine, steps: int) -> float:
    eng.add(list(range(100, 116)), SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    eng.step()  # prefill
    t = time.perf_counter()
    while eng.has_work:
        eng.step()
    return 1e3 * (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fp32,bf16,int8,int8-wo,int8-wo-bf16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sd = {k: v * 0 + torch.randn_like(v) * 0.02 for k, v in GPT2(GPT2_124M).state_dict().items()
          if k != "head.weight"}
    variants = a.variants.split(",")
    engines = {v: engine(v, sd, 16 + a.steps + 8) for v in variants}
    for eng in engines.values():  # warm-up: first-call allocations
        decode_ms(eng, 4)
    times = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            times[v].append(decode_ms(engines[v], a.steps))
    rows = []
    print(f"GPT-2-124M shape, batch 1, {a.threads} threads, {a.steps} decode steps x {a.rounds} rounds")
    print(f"{'variant':<14} {'ms/token':>9} {'tokens/s':>9} {'weights MB':>11} {'GB/s':>6}")
    for v in variants:
        ms = statistics.median(times[v])
        mb = weight_bytes(engines[v].model) / 1e6
        rows.append({"variant": v, "ms_per_token": round(ms, 2), "rounds_ms": [round(t, 2) for t in times[v]],
                     "weights_mb": round(mb, 1), "gb_per_s": round(mb / ms, 2)})
        print(f"{v:<14} {ms:>9.2f} {1e3 / ms:>9.1f} {mb:>11.1f} {mb / ms:>6.2f}")
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": a.threads, "steps": a.steps, "rounds": a.rounds, "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "generation.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

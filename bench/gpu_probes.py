"""Probes for bench/gpu_encoders.py: the copy bandwidth, cuBLAS GEMMs at a layer's shapes with the
bytes floor beside them, SDPA backends with and without a padding mask, and a kernel profile."""
from __future__ import annotations

import torch


def gpu_slug(name: str) -> str:
    """The model of a GPU as results files name it: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
    import re

    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"\W+", "-", name).strip("-")).lower()


def dev_inputs(feeds):
    return [torch.from_numpy(feeds[n]).cuda() for n in ("input_ids", "attention_mask", "token_type_ids")]


def cuda_or_smoke(device: str) -> bool | None:
    """A GPU bench's --device: True for cuda, False for a cpu smoke run of the script itself, None (said why)
    when cuda was asked for and torch sees no GPU."""
    if device != "cuda":
        return False
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--device cpu: a smoke run of this script)")
        return None
    return True


def graph_time_us(fn, n: int = 20, reps: int = 20) -> float:
    """Median time of one fn() call, from replays of a graph of n calls (launch gaps hidden)."""
    from millis.gpu.graph_timing import graph_us

    return graph_us(fn, n, reps)


def gemm_probe(bw_tbs: float) -> list[dict]:
    rows = []
    for M in (16, 128, 4096):
        for N, K in ((2304, 768), (768, 768), (3072, 768), (768, 3072)):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            w = torch.randn(N, K, device="cuda", dtype=torch.float16)
            us = graph_time_us(lambda: torch.nn.functional.linear(x, w))
            floor_us = (M * K + N * K + M * N) * 2 / (bw_tbs * 1e12) * 1e6
            rows.append({"M": M, "N": N, "K": K, "us": round(us, 2), "bytes_floor_us": round(floor_us, 2),
                         "tflops": round(2 * M * N * K / (us * 1e-6) / 1e12, 1)})
    return rows


def sdpa_probe() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    rows = []
    for B in (1, 32):
        q, k, v = (torch.randn(B, 12, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        bias = torch.zeros(B, 1, 1, 128, device="cuda", dtype=torch.float16)
        cases = [("auto+mask", None, bias), ("efficient+mask", SDPBackend.EFFICIENT_ATTENTION, bias),
                 ("cudnn+mask", SDPBackend.CUDNN_ATTENTION, bias), ("flash, no mask", SDPBackend.FLASH_ATTENTION, None),
                 ("cudnn, no mask", SDPBackend.CUDNN_ATTENTION, None)]
        for label, backend, m in cases:
            try:
                def fn(m=m):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                if backend is None:
                    us = graph_time_us(fn)
                else:
                    with sdpa_kernel(backend):
                        us = graph_time_us(fn)
                rows.append({"B": B, "case": label, "us": round(us, 2)})
            except Exception as e:
                rows.append({"B": B, "case": label, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    return rows


def bandwidth_tbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    b.synchronize()
    return 2 * x.numel() * 10 / (a.elapsed_time(b) * 1e-3) / 1e12


def kernel_profile(rt, feeds, calls: int = 20) -> list[dict]:
    """Kernels of the eager compact encoder at this shape (what each graph replay launches)."""
    from torch.profiler import ProfilerActivity, profile

    x = dev_inputs(feeds)
    with torch.inference_mode():
        rt.encoder(*x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                rt.encoder(*x)
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.count >= calls:
            rows.append({"kernel": ev.key[:90], "per_call": ev.count // calls,
                         "us_per_forward": round(t / calls, 2)})
    return sorted(rows, key=lambda r: -r["us_per_forward"])[:25]

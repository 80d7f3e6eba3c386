"""GPU timing without launch overhead: the calls captured in one CUDA graph and replayed (the kernel tuners
and the GPU benches share it), and the tuners' one rule for timing candidate configs."""
from __future__ import annotations

import torch


def graph_us(fn, calls: int = 20, reps: int = 5) -> float:
    """Median time (us) of one fn() call: `calls` captured in a CUDA graph (no launch gaps), replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compiles, outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def context_usable() -> bool:
    """After a failure: whether the CUDA context still runs work. A failed capture or compile leaves it usable
    (torch words a capture's failure "CUDA error: operation not permitted when stream is capturing" too); a
    kernel fault (an illegal address) poisons it, and every later call fails. True without CUDA."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:  # noqa: BLE001 -- the question asked
        return False


def time_candidates(candidates: list[dict], run) -> list[tuple[dict, float]]:
    """[(config, us)] of each candidate config that runs, fastest first: run(config) is the call timed by
    graph_us. A config Triton or cuBLAS refuses (resources, an unsupported dot or status) is passed over; a
    CUDA fault poisons the context, so it is raised."""
    timed = []
    for cand in candidates:
        try:
            timed.append((cand, graph_us(lambda: run(cand))))
        except Exception as e:  # noqa: BLE001 -- see the docstring
            if "CUDA error" in str(e) and "CUBLAS_STATUS" not in str(e):
                raise
    return sorted(timed, key=lambda t: t[1])

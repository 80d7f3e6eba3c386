"""The machine's read bandwidth, the ceiling of a batch-1 decode step (it reads every weight once):
bench/generation.py and bench/generation_gguf.py report each system's GB/s as a share of it."""
from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import numpy as np

C_SOURCE = ("#include <omp.h>\n"
            "double bw_sum(const float *a, long n, int t) { float s = 0.f;\n"
            "#pragma omp parallel for num_threads(t) reduction(+:s) schedule(static)\n"
            "for (long i = 0; i < n; i++) s += a[i];\nreturn s; }\n"
            "double bw_sum4(const float *a, long n, int t) { float s = 0.f;\n"  # exact when 256 * t divides n
            "#pragma omp parallel num_threads(t) reduction(+:s)\n"
            "{ const long q = n / t / 4 / 64 * 64; const float *p = a + omp_get_thread_num() * (n / t);\n"
            "  for (long i = 0; i < q; i += 64) for (int k = 0; k < 4; k++) {\n"
            "    const float *r = p + k * q + i; __builtin_prefetch(r + 256); __builtin_prefetch(r + 272);\n"
            "    __builtin_prefetch(r + 288); __builtin_prefetch(r + 304);\n"
            "    for (int j = 0; j < 64; j++) s += r[j]; } }\nreturn s; }\n")


def c_sums(work: Path):
    """(bw_sum, bw_sum4) from C_SOURCE built with cc -O3 -fopenmp into `work`, or the compiler's error text."""
    src, lib = work / "bw.c", work / "bw.so"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(C_SOURCE)
    r = subprocess.run(["cc", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", str(src),
                        "-o", str(lib)], check=False, capture_output=True, text=True)
    if r.returncode:
        return r.stderr[-300:]
    # the sums' threads sleep as soon as a sum ends (libgomp reads this when bw.so brings it in; the processes
    # the bench starts later do not inherit it): spinning on, one took a core from the cell after a probe, and
    # millis's pool, taking that for another process's, ran the next steps on one thread (llama_step.c)
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        c = ctypes.CDLL(str(lib))
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = before
    for f in (c.bw_sum, c.bw_sum4):
        f.restype, f.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    return c.bw_sum, c.bw_sum4


def measure_bandwidth(mib: int, threads: int, work: Path) -> dict:
    """Read bandwidth (GB/s, best of 5) of a `mib` MiB float32 reduction: numpy a.sum() on 1 thread and on
    `threads` threads (one half each: numpy releases the GIL), and a C loop (cc -O3 -fopenmp) when cc works.
    `gbps` is the best method's best run; `gbps_median` the highest of the methods' median runs, recorded
    beside it because a VM's bandwidth moves by the minute (Zen 4, 2026-12-02: the C loop at 2 threads read
    27-33 GB/s in some minutes and 42-55 in others; RoundProbe below measures it again in each round of a
    bench). `c4s_*`: the same C sum with each thread's part read as 4 streams side by side (a quarter each),
    prefetched 1 KiB ahead: some cores read far more that way (Sapphire Rapids, 2026-12-03: 24-30 GB/s at 2
    threads against 20 as one stream each), and millis's decode reads so there (kernels/packed.c
    decode_streams), so the ceiling is the higher of the two."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones((mib << 20) // 4, np.float32)  # written once: every page is resident
    parts = np.array_split(a, threads)

    medians = {}

    def best(f, key):
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
        medians[key] = round(a.nbytes / sorted(t)[len(t) // 2] / 1e9, 2)
        return round(a.nbytes / min(t) / 1e9, 2)
    out = {"bytes": a.nbytes, "numpy_1": best(a.sum, "numpy_1")}
    with ThreadPoolExecutor(threads) as ex:
        out[f"numpy_{threads}"] = best(lambda: list(ex.map(np.sum, parts)), f"numpy_{threads}")
    sums = c_sums(work)
    if isinstance(sums, str):
        out["c_error"] = sums
    else:
        for t in sorted({1, threads}):
            out[f"c_{t}"] = best(lambda t=t: sums[0](a.ctypes.data, a.size, t), f"c_{t}")
            out[f"c4s_{t}"] = best(lambda t=t: sums[1](a.ctypes.data, a.size, t), f"c4s_{t}")
    out["gbps"] = max(v for k, v in out.items() if k.startswith(("numpy_", "c_", "c4s_")) and isinstance(v, float))
    out["medians"] = medians
    out["gbps_median"] = max(medians.values())
    return out


class RoundProbe:
    """The read bandwidth again in each round of a bench, next to the decode it is the ceiling of, so a
    decode's share of it compares figures from the same minute (the one probe at the start of a run can
    land in a fast minute of the VM and the decodes in slow ones, or the other way). read(): GB/s, the best
    of `runs` passes of the C sums (one stream and 4 streams a thread) over `mib` MiB; None without cc."""

    def __init__(self, mib: int, threads: int, work: Path, runs: int = 3) -> None:
        self.sums, self.threads, self.runs = c_sums(work), threads, runs
        self.a = np.ones((mib << 20) // 4, np.float32) if not isinstance(self.sums, str) else None

    def read(self) -> float | None:
        if self.a is None:
            return None
        best = 0.0
        for f in self.sums:
            for _ in range(self.runs):
                t0 = time.perf_counter()
                f(self.a.ctypes.data, self.a.size, self.threads)
                best = max(best, self.a.nbytes / (time.perf_counter() - t0) / 1e9)
        return round(best, 2)

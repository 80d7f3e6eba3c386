"""millis's own int8 Linear for CPU decode: the AVX2 kernel of `qgemm.c`, compiled on first use.

At batch 1 a decode step is a chain of matrix-vector products, bound by reading the weights. Each
packed tile of four weight rows is one sequential stream. In a one-off micro-benchmark on this
2-core AVX2 CPU (GPT-2's matrices at M=1, each called repeatedly, so partly cache-resident) it ran
GPT-2's four per-layer matmuls in 0.02-0.05 ms against 0.06-0.10 ms for torch's dynamic
quantization (fbgemm), and the 50257-row head in 1.22 ms against 1.29 ms. At M=8 and M=128 fbgemm
was 15-20% faster. End to end: docs/generation.md's CPU decode table (bench/generation.py).
Numerics: int8 weights per output row, int8 activations per row (so, unlike fbgemm's per-tensor
activation scale, a row's output does not depend on its batch-mates), int32 sums.

`library()` compiles `qgemm.c` with the system C compiler (`$CC`, else `cc`) into the millis cache
once per source version, and returns None when that is not possible (no AVX2, no compiler, a
failed build; `why_unavailable()` says which): callers then fall back to torch's dynamic
quantization.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

import torch
from torch import nn

from millis.common.config import env_switch

SOURCE = Path(__file__).with_name("qgemm.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # with native.ISA_FLAGS["avx2"]
_why: list[str] = []


def why_unavailable() -> str | None:
    library()
    return _why[0] if _why else None


@functools.cache
def library() -> ctypes.CDLL | None:
    from millis.common.hardware import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= cpu_flags():
        _why.append("the CPU has no AVX2 + FMA")
        return None
    if env_switch("MILLIS_NO_KERNELS"):
        _why.append("MILLIS_NO_KERNELS is set")
        return None
    from millis.common.errors import MillisError
    from millis.kernels.native import build

    try:  # torch is imported first there: its libgomp.so.1 is reused, one OpenMP thread pool
        lib = build("qgemm", (SOURCE.name,), "avx2", tuple(FLAGS))
    except MillisError as e:
        _why.append(str(e))
        return None
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.quantize_rows.argtypes = [P, I, I, I, I, P, P, P]
    lib.quantize_rows.restype = None
    lib.qgemm.argtypes = [P, P, P, I, I, P, P, P, I, P, I, ctypes.c_int]
    lib.qgemm.restype = None
    return lib


class Int8Linear(nn.Module):
    """A Linear with int8 weights (per output row) run by `qgemm.c`; fp32 in, fp32 out."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lib = library()
        assert self.lib is not None, why_unavailable()
        w = lin.weight.detach().float()
        N, K = w.shape
        self.in_features, self.out_features = K, N
        self.kp, np_ = -(-K // 32) * 32, -(-N // 4) * 4     # K padded to 32-byte chunks, N to 4-row tiles
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.zeros(np_, self.kp, dtype=torch.int8)
        q[:N, :K] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        packed = q.view(np_ // 4, 4, self.kp // 32, 32).permute(0, 2, 1, 3).contiguous()  # (Np/4, Kp/32, 4, 32)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", torch.cat([scale, torch.zeros(np_ - N)]).contiguous())
        bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K).float().contiguous()                          # (M, K)
        M = x2.shape[0]
        xq = torch.empty(2, M, self.kp, dtype=torch.int8)                   # x and |x|, int8
        sx = torch.empty(M)
        y = torch.empty(M, N)
        q, a = xq.data_ptr(), xq.data_ptr() + M * self.kp
        self.lib.quantize_rows(x2.data_ptr(), M, K, K, self.kp, q, a, sx.data_ptr())
        self.lib.qgemm(q, a, sx.data_ptr(), M, self.kp, self.weight_packed.data_ptr(),
                       self.weight_scale.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(), N,
                       y.data_ptr(), N, torch.get_num_threads())
        return y.view(*x.shape[:-1], N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

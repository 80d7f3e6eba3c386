"""Weight-only quantized linears for GPU decode: int8 and fp8 (e4m3) with a scale per output channel,
int4 with a scale and a minimum per 64 inputs. Activations stay in the model's dtype (bf16).

Decode reads every weight once per token, so at batch 1 to 32 a step is bound by weight bytes: int8
halves bf16's, int4 quarters them (plus 1/16 for its scales). `WeightOnlyLinear` keeps the packed weights
and runs them through Triton kernels (weight_only_kernels.py: tensor-core tiles, one-row gemv kernels, the
fastest per shape measured at load) that convert the packed values in registers, with no dequantized copy
in memory, for up to KERNEL_ROWS rows; longer inputs (prefill, compute-bound) dequantize once per call
(one Triton pass: `kernel_dequantize`) and use cuBLAS. The torch path (`dequantize` + `F.linear`) is the
reference and the CPU stand-in: the same values the kernel multiplies.

int4 layout (N rows, K inputs, K padded to a multiple of GROUP with zero columns): in group g of a row,
byte j holds input g*GROUP + j in its low nibble and g*GROUP + GROUP/2 + j in its high nibble, so a kernel
takes the two halves of a group as two dots without interleaving. w = q * scale + low, q in 0..15, with
scale and low stored (groups, N): a group's values for BLOCK_N consecutive rows are one coalesced load.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from millis.common.dtypes import WEIGHT_ONLY_FORMATS as FORMATS
from millis.common.errors import MillisError
from millis.gpu.weight_only_kernels import GROUP, TUNED, kernel_dequantize, kernel_matmul, triton, tune_key

KERNEL_ROWS = 64    # at most this many rows (batch x tokens) take the fused kernel; more dequantize + cuBLAS
FP8_MAX = 448.0     # largest finite float8_e4m3fn


# ---- quantization (at load, on the weights' device) ----

def quantize_channel(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8 or float8_e4m3fn, scale (N,) fp32 with w ~ q * scale."""
    w = w.float()
    amax = w.abs().amax(1).clamp_min(1e-12)                                # (N,)
    if fmt == "int8":
        scale = amax / 127.0
        return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale
    scale = amax / FP8_MAX
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> packed (N, Kp/2) uint8, scale (G, N) fp32, low (G, N) fp32; Kp = G * GROUP.

    Asymmetric per group: q = round((w - min) / scale) in 0..15, scale = (max - min) / 15. Padding columns
    are 0 (they meet zero activations in the kernel and are cut by `dequantize`)."""
    N, K = w.shape
    G = -(-K // GROUP)
    wf = F.pad(w.float(), (0, G * GROUP - K)).view(N, G, GROUP)            # (N, G, GROUP)
    lo, hi = wf.amin(2), wf.amax(2)                                       # (N, G)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((wf - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    half = GROUP // 2
    packed = q[..., :half] | (q[..., half:] << 4)                          # (N, G, GROUP/2)
    return packed.reshape(N, G * half).contiguous(), scale.t().contiguous(), lo.t().contiguous()


def dequantize(fmt: str, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, k: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, k) weights a packed matrix stands for, computed in `dtype`: in fp32 exactly what the kernel
    multiplies; in bf16 (the prefill path) one rounding more, without fp32 copies of the whole matrix."""
    if fmt != "int4":
        return q.to(dtype) * scale[:, None].to(dtype)
    N = q.shape[0]
    b = q.view(N, -1, GROUP // 2)                                         # (N, G, GROUP/2)
    v = torch.cat((b & 15, b >> 4), dim=2).to(dtype)                      # (N, G, GROUP)
    w = v * scale.t().to(dtype)[..., None] + low.t().to(dtype)[..., None]
    return w.reshape(N, -1)[:, :k]


def packed_bytes(m: "WeightOnlyLinear") -> int:
    """Bytes a matmul reads of its weights: the packed values and the scales (and int4's minima)."""
    return sum(t.numel() * t.element_size() for t in (m.q, m.scale, m.low) if t is not None)


class WeightOnlyLinear(nn.Module):
    """An nn.Linear with packed weights: forward(x (..., K)) -> (..., N) in x's dtype."""

    def __init__(self, lin: nn.Linear, fmt: str) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise MillisError(f"weight-only format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt, self.out_features, self.in_features = fmt, lin.out_features, lin.in_features
        w = lin.weight.detach()
        low = None
        if fmt == "int4":
            q, scale, low = quantize_int4(w)
        else:
            q, scale = quantize_channel(w, fmt)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().clone())
        self.use_kernel = triton is not None and w.is_cuda  # tests turn it on under TRITON_INTERPRET

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.use_kernel and triton is not None:  # one Triton pass (the same values), not the torch ops' several
            return kernel_dequantize(self.fmt, self.q, self.scale, self.low, self.in_features, dtype)
        return dequantize(self.fmt, self.q, self.scale, self.low, self.in_features, dtype)

    def matmul(self, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
        """x (M, K) contiguous -> (M, N), no bias: a kernel config (weight_only_kernels.kernel_matmul; None: its
        guess), or {"dequant": True}: the weights dequantized into x's dtype, then cuBLAS."""
        if config is not None and config.get("dequant"):
            return F.linear(x, self.weight(x.dtype))
        return kernel_matmul(self.fmt, x, self.q, self.scale, self.low, self.out_features, self.in_features, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.use_kernel and x2.shape[0] <= KERNEL_ROWS:
            y = self.matmul(x2.contiguous(), TUNED.get(tune_key(self.fmt, self.out_features, self.in_features,
                                                                x2.shape[0])))
        else:
            y = F.linear(x2, self.weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def quantize_weight_only(model: nn.Module, fmt: str) -> int:
    """Replace the model's nn.Linear layers (projections and the output head; not the embedding) with
    WeightOnlyLinear in place. With int4 the head is int8: its 4-bit error lands on every logit (llama.cpp's
    Q4 files keep the output matrix at 6 bits for the same reason). Returns the number of layers replaced."""
    if fmt not in FORMATS:
        raise MillisError(f"weight-only format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, WeightOnlyLinear(child, "int8" if fmt == "int4" and name == "head" else fmt))
    return len(swaps)


def quantize_and_tune(model: nn.Module, fmt: str) -> str:
    """A decoder on CUDA in a weight-only format: quantized in place, then each matmul shape's kernel measured
    for one row and for each tile of up to KERNEL_ROWS rows (weight_only_kernels.tune): decode and prefill
    reach every row class. Returns its backend name."""
    from millis.gpu.weight_only_kernels import TUNED, block_sizes, tune

    if triton is None:
        raise MillisError(f"--quant {fmt} on cuda runs Triton kernels, and Triton is not installed")
    quantize_weight_only(model, fmt)
    # every row class the kernels take, whatever max_batch: a prefill of up to KERNEL_ROWS tokens runs them too
    rows = (1, *sorted({block_sizes(b, 1)[0] for b in range(2, KERNEL_ROWS + 1)}))
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    tune(layers, rows)
    # a shape is built when one of its kernels ran: a DEQUANT entry alone (cuBLAS won, or was all that ran)
    # leaves the rows without an entry to a kernel that may not compile
    failed = {(m.fmt, m.out_features, m.in_features) for m in layers} - {
        k[:3] for k, c in TUNED.items() if not c.get("dequant")}
    for m in layers:  # no candidate built for this shape (this Triton / GPU): dequantize + cuBLAS, slower, works
        if (m.fmt, m.out_features, m.in_features) in failed:
            m.use_kernel = False
    if failed:
        warnings.warn(f"no {fmt} kernel built for {sorted(failed)}: those matmuls dequantize per call")
    return f"triton-{fmt}"

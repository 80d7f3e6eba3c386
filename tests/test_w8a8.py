"""W8A8 GEMMs of the GPU encoder (millis.gpu.w8a8): int8 / fp8 weights per channel x activations per token.

On the CPU: the activation quantization against hand-made rows, the torch path (torch._int_mm /
torch._scaled_mm) against exact integer / fp8 products and against fp32, the int8 / fp8 encoder end to end
against HF fp32 (and visibly quantized), the config rules and the cuda-int8 / cuda-fp8 variants. The Triton
kernel against the torch path: on CUDA (marked gpu), or on the CPU through Triton's interpreter when Triton
is installed and TRITON_INTERPRET=1; skipped otherwise. The interpreter's fp32 -> fp8 cast mis-rounds
values next to a power of two, so its fp8 test feeds rows whose quantized values are exact (no rounding).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.encoder.source import Pooling
from millis.gpu import RunOptions, from_hf
from millis.gpu import w8a8
from millis.gpu import w8a8_kernels as wk
from millis.runtimes.cuda import CudaGraphRuntime

HAS_CUDA = torch.cuda.is_available()
INTERPRET = wk.triton is not None and os.environ.get("TRITON_INTERPRET") == "1" and not HAS_CUDA
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def test_int8_rows_round_half_away_from_zero_with_a_scale_per_row():
    # row 0: max 127 -> scale 1, so v = x: 2.5 -> 3, -2.5 -> -3, 0.49 -> 0; row 1 all zero: finite scale
    x = torch.tensor([[127.0, 2.5, -2.5, 0.49, -127.0], [0.0] * 5, [1.0, -0.5, 0.25, 0.0, 0.0]])
    q, s = w8a8.quantize_rows(x, "int8")
    assert q.dtype == torch.int8 and s.shape == (3,) and s.dtype == torch.float32
    assert q[0].tolist() == [127, 3, -3, 0, -127] and s[0] == 1.0
    assert q[1].tolist() == [0] * 5 and torch.isfinite(s[1]) and s[1] > 0
    assert q[2].tolist() == [127, -64, 32, 0, 0]                       # -63.5 -> -64, 31.75 -> 32
    f, fs = w8a8.quantize_rows(x, "fp8")
    assert f.dtype == torch.float8_e4m3fn and float(f[0].float().abs().max()) == 448.0
    assert torch.allclose(f.float() * fs[:, None], x, rtol=0.07, atol=1e-6)  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_torch_path_is_the_exact_quantized_product(fmt):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    x[3] *= 30  # an outlier row: its own scale, the other rows keep their resolution
    qw = w8a8.quantize_weight(w, fmt)
    xq, sx = w8a8.quantize_rows(x, fmt)
    exact = (xq.double() @ qw.q.double().t()) * sx.double()[:, None] * qw.scale.double()[None, :] + b.double()
    y = w8a8.linear_torch(x, qw, b)
    assert y.shape == (37, 80) and y.dtype == torch.float32
    np.testing.assert_allclose(y.double().numpy(), exact.numpy(), rtol=1e-5, atol=1e-4)
    ref = F.linear(x, w, b)
    rel = ((y - ref).norm(dim=1) / ref.norm(dim=1)).max()
    assert rel < (0.02 if fmt == "int8" else 0.08), rel
    g_out = wk.linear(x, qw, b, gelu=True)  # kernel=False: the torch path
    assert torch.allclose(g_out, F.gelu(y), atol=1e-6)
    assert torch.equal(wk.linear(x, w, b), F.linear(x, w, b))       # a plain weight: F.linear


def test_config_rules():
    with pytest.raises(MillisError, match="unknown gemm 'int4'"):
        RunOptions(gemm="int4")
    with pytest.raises(MillisError, match="W8A8 format"):
        w8a8.quantize_weight(torch.ones(4, 4), "int4")


def cpu_runtime(model, task, gemm, **kw) -> CudaGraphRuntime:
    pooling = Pooling(normalize=True) if task == "embed" else Pooling()
    return CudaGraphRuntime(model, "cuda-graph", INPUTS, {"classify": "logits", "embed": "embedding"}[task], task,
                            pooling, dtype="fp32", fuse="torch", device="cpu", gemm=gemm, **kw)


@pytest.mark.parametrize("gemm", ["int8", "fp8"])
def test_quantized_encoder_against_hf_fp32_on_cpu(gemm):
    """The MiniLM-shaped random BERT (6 x 384, padded rows) through the runtime's buckets on the CPU:
    close to HF fp32, and not the fp32 encoder itself (the GEMMs really are quantized)."""
    from test_gpu import minilm_errors

    quant = minilm_errors(lambda model, task, pooling: cpu_runtime(model, task, gemm, buckets=(Shape(4, 64),)))
    exact = minilm_errors(lambda model, task, pooling: cpu_runtime(model, task, "fp", buckets=(Shape(4, 64),)))
    limit = 0.03 if gemm == "int8" else 0.06
    for task in ("classify", "embed"):
        assert exact[task] < 1e-5 < quant[task] < limit, (task, quant, exact)


def test_runtime_options_carry_the_gemm(tmp_path):
    from millis.encoder.tiny import build_tiny

    rt = CudaGraphRuntime.from_options(build_tiny("bert"), "cuda-int8", INPUTS, "embedding",
                                       {"task": "embed", "dtype": "fp32", "fuse": "torch", "device": "cpu",
                                        "gemm": "int8", "buckets": ["2x16"]})
    lw = rt.encoder.layers[0]
    assert isinstance(lw.wqkv, w8a8.QuantWeight) and lw.wqkv.q.dtype == torch.int8
    assert lw.wqkv.q.shape[0] == 3 * rt.encoder.cfg.hidden and rt.tuned == {}  # nothing to tune on the CPU
    out = rt.run({"input_ids": np.array([[2, 5, 7, 3]]), "attention_mask": np.ones((1, 4), np.int64),
                  "token_type_ids": np.zeros((1, 4), np.int64)})["embedding"]
    assert out.shape == (1, rt.encoder.cfg.hidden) and np.isfinite(out).all()


def test_gpu_variants_include_w8a8():
    from millis.optimize.build.variants import CATALOG, GPU_VARIANTS

    assert {"cuda-int8", "cuda-fp8"} <= set(GPU_VARIANTS)
    assert CATALOG["cuda-int8"].options["gemm"] == "int8" and CATALOG["cuda-fp8"].precision == "fp8"


# ---- the Triton kernel against the torch path ----

def exact_fp8_rows(M: int, K: int, g: torch.Generator) -> torch.Tensor:
    """Rows whose quantization is exact: e4m3 values times a power-of-two scale, each row holding +-448."""
    v = torch.randn(M, K, generator=g).mul(60).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    v[:, 0] = 448.0
    return v * (2.0 ** torch.randint(-12, -4, (M, 1), generator=g))


def kernel_cases(fmt: str, device: str, interpreter: bool):
    g = torch.Generator().manual_seed(1)
    for M, N, K in ((5, 48, 64), (40, 96, 208), (128, 64, 384)):  # K % 16 == 0: cuBLAS fp8; 208: a K tail
        x = exact_fp8_rows(M, K, g) if fmt == "fp8" and interpreter else torch.randn(M, K, generator=g)
        yield x.to(device), w8a8.quantize_weight(torch.randn(N, K, generator=g).to(device), fmt), \
            torch.randn(N, generator=g).to(device)


def check_kernel(fmt: str, device: str, dtype: torch.dtype, interpreter: bool) -> None:
    cands = [c for c in wk.CANDIDATES + (wk.FP8_EXTRA if fmt == "fp8" else [])
             if not c.get("torch") and (not interpreter or fmt == "int8" or c.get("UPCAST"))]
    for x, qw, b in kernel_cases(fmt, device, interpreter):
        x, b = x.to(dtype), b.to(dtype)
        for gelu in (False, True):
            ref = w8a8.linear_torch(x, qw, b if gelu else None, gelu).float()
            for cand in cands:
                y = wk.kernel_linear(x, qw, b if gelu else None, gelu, cand)
                assert y.shape == ref.shape and y.dtype == dtype
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                assert err < (1e-5 if dtype == torch.float32 else 1e-2), (fmt, x.shape, cand, err)


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_kernel_in_the_interpreter(fmt):
    check_kernel(fmt, "cpu", torch.float32, interpreter=True)
    x = torch.randn(20, 64)[:, ::2]                                    # a strided input: copied, same answer
    qw = w8a8.quantize_weight(torch.randn(16, 32), "int8")
    assert torch.allclose(wk.kernel_linear(x, qw, config=wk.DEFAULT), w8a8.linear_torch(x, qw), atol=1e-5)


def gpu_has(fmt: str) -> None:
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")


on_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_kernel_and_tuning_on_cuda(fmt):
    gpu_has(fmt)
    check_kernel(fmt, "cuda", torch.float16, interpreter=False)
    qw = w8a8.quantize_weight(torch.randn(768, 768, device="cuda"), fmt)
    timed = wk.tune([qw], (128,), torch.float16)
    key = wk.tune_key(fmt, 768, 768, 128)
    assert key in timed and wk.TUNED[key] == timed[key][0][0] and all(us > 0 for _, us in timed[key])


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("gemm", ["int8", "fp8"])
def test_quantized_graphs_against_hf(gemm):
    from test_gpu import minilm_errors, runtime

    gpu_has(gemm)
    results = minilm_errors(lambda model, task, pooling: runtime(model, task, pooling=pooling, dtype="fp16",
                                                                 gemm=gemm, buckets=(Shape(4, 64),)))
    limit = 0.03 if gemm == "int8" else 0.06
    assert results["classify"] < limit and results["embed"] < limit, results


def test_time_candidates_skips_refused_configs_and_raises_faults(monkeypatch):
    """The tuners' rule (millis.gpu.graph_timing.time_candidates), with graph_us stood in for: fastest first;
    a config Triton or cuBLAS refuses is passed over; a CUDA fault (the context is poisoned) is raised."""
    from millis.gpu import graph_timing

    monkeypatch.setattr(graph_timing, "graph_us", lambda fn: fn())

    def run(c):
        if c["n"] == 1:
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        if c["n"] == 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")
        if c["n"] == 9:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return 10.0 / c["n"]

    got = graph_timing.time_candidates([{"n": n} for n in (4, 1, 2, 8, 5)], run)
    assert [c["n"] for c, _ in got] == [8, 5, 4] and [us for _, us in got] == [1.25, 2.0, 2.5]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        graph_timing.time_candidates([{"n": 4}, {"n": 9}], run)

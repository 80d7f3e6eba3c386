"""GPU weight-only formats (millis.gpu.weight_only): int8 / fp8 per channel, int4 per group of 64.

On the CPU: the packing against a hand-made matrix, the quantization error bounds, the torch path against
F.linear on the dequantized weights, a quantized tiny Llama against the original, the engine's config
rules. The Triton kernels against the torch path: on CUDA in bf16 (marked gpu), or on the CPU through
Triton's interpreter when Triton is installed and TRITON_INTERPRET=1 (fp32 / fp16: the interpreter's bf16
dot is not exact); skipped otherwise.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from millis.common.errors import MillisError
from millis.gen.config import EngineConfig, LlamaConfig
from millis.gen.models.layers import make_batch, setup_caches
from millis.gen.models.llama import Llama
from millis.gpu import weight_only as wo
from millis.gpu.weight_only_kernels import (GEMV_CANDIDATES, TILE_CANDIDATES, kernel_dequantize, kernel_matmul, tune,
                                           tune_key)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = wo.triton is not None and os.environ.get("TRITON_INTERPRET") == "1" and not HAS_CUDA


def test_int4_packs_two_halves_of_a_group_per_byte():
    # one row, K = 70: two groups of 64 (the second padded with zeros); values chosen to hit every level
    w = torch.arange(70, dtype=torch.float32)[None] % 16
    q, scale, low = wo.quantize_int4(w)
    assert q.shape == (1, 64) and q.dtype == torch.uint8 and scale.shape == low.shape == (2, 1)
    # group 0: byte j = input j (low nibble) and input 32 + j (high nibble); min 0, max 15 -> scale 1
    assert scale[0, 0] == 1 and low[0, 0] == 0
    assert int(q[0, 3]) == (3 % 16) | ((35 % 16) << 4)
    back = wo.dequantize("int4", q, scale, low, 70)
    assert back.shape == (1, 70) and torch.equal(back, w)


@pytest.mark.parametrize("fmt", wo.FORMATS)
def test_quantization_error_is_bounded(fmt):
    torch.manual_seed(0)
    w = torch.randn(48, 200) * torch.linspace(0.1, 3, 48)[:, None]  # rows of very different ranges
    lin = torch.nn.Linear(200, 48, bias=False)
    lin.weight.data = w
    m = wo.WeightOnlyLinear(lin, fmt)
    err = (m.weight() - w).abs()
    if fmt == "int8":   # half a step of amax / 127 per row
        assert (err <= m.scale[:, None] / 2 + 1e-6).all()
    elif fmt == "fp8":  # e4m3: 3 mantissa bits, a relative error of at most 1/16 (normal range)
        assert (err <= w.abs() / 16 + m.scale[:, None] * 2 ** -9).all()
    else:               # half a step of (max - min) / 15 per group of 64
        steps = m.scale.t().repeat_interleave(wo.GROUP, dim=1)[:, :200]
        assert (err <= steps / 2 + 1e-5).all()
    assert err.max() > 0  # it did quantize


@pytest.mark.parametrize("fmt", wo.FORMATS)
def test_torch_path_is_linear_on_the_dequantized_weights(fmt):
    torch.manual_seed(1)
    lin = torch.nn.Linear(130, 40, bias=True)
    m = wo.WeightOnlyLinear(lin, fmt)
    assert not m.use_kernel  # CPU tensors: the torch path
    x = torch.randn(2, 3, 130)
    y = m(x)
    assert y.shape == (2, 3, 40)
    ref = F.linear(x, m.weight(), lin.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    rel = (y - lin(x)).norm() / lin(x).norm()  # and close to the unquantized layer
    assert rel < {"int8": 0.01, "fp8": 0.05, "int4": 0.12}[fmt], rel


@pytest.mark.parametrize("fmt", wo.FORMATS)
def test_a_shape_tuned_to_dequantize_runs_cublas_on_the_same_weights(fmt, monkeypatch):
    """`tune` may find dequantize + cuBLAS fastest at several rows (int4's tile on the H200); forward then
    takes it for that shape and row class alone, on the weights the kernels multiply (no Triton needed)."""
    from millis.gpu import weight_only_kernels as wk

    torch.manual_seed(4)
    lin = torch.nn.Linear(130, 40, bias=True)
    m = wo.WeightOnlyLinear(lin, fmt)
    m.use_kernel = True  # the kernel path's dispatch, on CPU tensors
    key = wk.tune_key(fmt, 40, 130, 8)
    # tune keeps what time_candidates ranks first: stand DEQUANT in as the fastest of the tiles + DEQUANT
    seen = {}

    def fastest_last(cands, run):
        seen["cands"] = list(cands)
        return [(c, 1.0 + i) for i, c in enumerate(reversed(cands))]

    monkeypatch.setattr(wk, "time_candidates", fastest_last)
    monkeypatch.setattr(wk, "TUNED", {})
    monkeypatch.setattr(wo, "TUNED", wk.TUNED)
    picked = wk.tune([m], rows=(8,))
    assert wk.DEQUANT in seen["cands"] and wk.TUNED[key] == wk.DEQUANT and picked[key][0][0] == wk.DEQUANT
    x = torch.randn(8, 130)
    y = m(x)  # 8 rows: the DEQUANT entry, no kernel launched
    assert torch.allclose(y, F.linear(x, m.weight(), lin.bias), atol=1e-5)
    launched = []  # one row: no entry for that row class, so the kernel (its guess) is asked, not cuBLAS
    monkeypatch.setattr(wo, "kernel_matmul", lambda *a: launched.append(a) or torch.zeros(a[1].shape[0], a[5]))
    m(torch.randn(1, 130))
    assert len(launched) == 1 and launched[0][-1] is None


def test_shapes_whose_kernels_never_build_dequantize_even_if_cublas_was_timed(monkeypatch):
    """On a GPU where no kernel of a format compiles (fp8 before sm89), tuning times DEQUANT alone at several
    rows: that must not count as built, or one row would ask for the kernel that failed."""
    from millis.gpu import weight_only_kernels as wk

    monkeypatch.setattr(wk, "TUNED", {})
    monkeypatch.setattr(wo, "TUNED", wk.TUNED)
    monkeypatch.setattr(wo, "triton", object())  # as if Triton were installed
    monkeypatch.setattr(wk, "time_candidates", lambda cands, run: [(c, 1.0) for c in cands if c.get("dequant")])
    model = tiny_llama()
    with pytest.warns(UserWarning, match="no fp8 kernel built"):
        wo.quantize_and_tune(model, "fp8")
    x = torch.randn(1, 128)  # and the layers run on the weights the kernels would have multiplied
    assert torch.allclose(model.layers[0].attn.wqkv(x), F.linear(x, model.layers[0].attn.wqkv.weight()), atol=1e-5)


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=64, hidden_dim=256,
                      tie_head=True)
    model = Llama(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.ones_(p)
    return model


@pytest.mark.parametrize("fmt", wo.FORMATS)
def test_quantized_llama_is_the_model_on_its_dequantized_weights(fmt):
    import copy

    model = tiny_llama()
    ref, deq = copy.deepcopy(model), copy.deepcopy(model)
    n = wo.quantize_weight_only(model, fmt)
    assert n == 2 * 4 + 1  # wqkv, wo, w13, w2 per block, and the head
    head = model.head
    assert isinstance(head, wo.WeightOnlyLinear) and head.fmt == ("int8" if fmt == "int4" else fmt)
    assert isinstance(model.tok_emb, torch.nn.Embedding)  # the embedding stays a float table
    assert torch.equal(model.tok_emb.weight, ref.tok_emb.weight)
    qmods = dict(model.named_modules())
    for name, m in deq.named_modules():  # the float model with every matrix replaced by what the format keeps
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(qmods[name].weight())
    for m in (model, ref, deq):
        setup_caches(m, 1, 64)
    ids = [list(range(3, 43))]
    with torch.inference_mode():
        a, b, c = (m(make_batch(ids, [0], [0], last_only=False))[0] for m in (ref, model, deq))
    assert torch.allclose(b, c, atol=1e-5, rtol=1e-5)
    # and near the original (random weights of a tiny model: loose bounds, int4 the loosest)
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert rel < {"int8": 0.04, "fp8": 0.12, "int4": 0.4}[fmt], rel
    assert agree >= {"int8": 0.9, "fp8": 0.85, "int4": 0.6}[fmt], agree


def test_engine_config_rules():
    with pytest.raises(MillisError, match="GPU weight-only format"):
        EngineConfig(quant="int4")
    with pytest.raises(MillisError, match="weight-only .* with dtype bf16"):
        EngineConfig(quant="int4", device="cuda", dtype="fp32")
    with pytest.raises(MillisError, match="weight-only"):
        EngineConfig(quant="int8-torch", device="cuda", dtype="bf16")
    with pytest.raises(MillisError, match="fp32 on cpu"):
        EngineConfig(quant="int8", dtype="bf16")
    with pytest.raises(MillisError, match="must be one of"):
        wo.WeightOnlyLinear(torch.nn.Linear(64, 8), "int2")
    EngineConfig(quant="fp8", device="cuda", dtype="bf16")  # valid without touching a GPU
    with pytest.raises(MillisError, match="not with device cuda"):  # it would be a silent no-op there
        EngineConfig(device="cuda", speculate=4)
    EngineConfig(speculate=4)


# ---- the Triton kernels against the torch path ----

SHAPES = [(1, 40, 96), (1, 24, 1100), (5, 48, 130), (17, 33, 64), (64, 96, 576)]


@pytest.mark.parametrize("fmt", wo.FORMATS)
@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
def test_kernels_in_the_interpreter(fmt):
    torch.manual_seed(2)
    for M, N, K in SHAPES:
        m = wo.WeightOnlyLinear(torch.nn.Linear(K, N), fmt)
        for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            x = torch.randn(M, K).to(dt)
            ref = (F.linear(x.float(), m.weight()) + m.bias).to(dt).float()
            m.use_kernel = True
            out = m(x).float()
            assert torch.allclose(out, ref, atol=tol * max(1.0, ref.abs().max().item())), (fmt, M, N, K, dt)
            # every candidate `tune` may pick (the one-row gemv kernels at one row), through the same call
            for cand in (GEMV_CANDIDATES if M == 1 else []) + TILE_CANDIDATES:
                y = kernel_matmul(fmt, x, m.q, m.scale, m.low, N, K, cand).float() + m.bias
                assert torch.allclose(y.to(dt).float(), ref, atol=tol * max(1.0, ref.abs().max().item())), cand


def dequant_shapes():
    return [(40, 96), (24, 1100), (33, 64), (96, 576), (7, 130)]  # int4: K past its groups (1100, 130)


@pytest.mark.parametrize("fmt", wo.FORMATS)
@pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="Triton's interpreter on the CPU, or CUDA")
def test_one_pass_dequantize_gives_the_torch_values_exactly(fmt):
    """The prefill path's Triton dequantize (weight_only_kernels.kernel_dequantize) against the torch ops it
    replaces, bit for bit, in every dtype a model may run (bf16 on CUDA only: numpy has none)."""
    dev = "cuda" if HAS_CUDA else "cpu"
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if HAS_CUDA else ())
    torch.manual_seed(4)
    for N, K in dequant_shapes():
        m = wo.WeightOnlyLinear(torch.nn.Linear(K, N, device=dev), fmt)
        for dt in dtypes:
            ref = wo.dequantize(fmt, m.q, m.scale, m.low, K, dt)
            got = kernel_dequantize(fmt, m.q, m.scale, m.low, K, dt)
            assert got.shape == ref.shape == (N, K) and got.dtype == dt
            assert torch.equal(got, ref), (fmt, N, K, dt, (got.float() - ref.float()).abs().max().item())
        m.use_kernel = True  # the prefill path: rows past KERNEL_ROWS through the one-pass dequantize
        x = torch.randn(wo.KERNEL_ROWS + 3, K, device=dev)
        want = F.linear(x, wo.dequantize(fmt, m.q, m.scale, m.low, K)) + m.bias
        assert torch.allclose(m(x), want, atol=1e-5), (fmt, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", wo.FORMATS)
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_kernels_on_cuda(fmt):
    torch.manual_seed(3)
    # the tiny shapes, SmolLM2's (576 / 1536 wide) and Llama-3.2-1B's (2048 / 8192) at 1, 8 and 32 rows
    shapes = SHAPES + [(M, N, K) for M in (1, 8, 32) for N, K in ((1536, 576), (576, 1536), (3072, 2048),
                                                                   (2048, 8192), (16384, 2048))]
    for M, N, K in shapes:
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        m = wo.WeightOnlyLinear(lin, fmt)
        assert m.use_kernel
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), wo.dequantize(fmt, m.q, m.scale, m.low, K))  # the torch path's weights
        out = m(x).float()
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (fmt, M, N, K, err)  # bf16 output rounding (~4e-3) on fp32 sums of the same products
        if N in (1536, 3072):  # every candidate `tune` may pick, and `tune` itself
            for cand in (GEMV_CANDIDATES if M == 1 else []) + TILE_CANDIDATES:
                y = kernel_matmul(fmt, x, m.q, m.scale, m.low, N, K, cand).float()
                assert ((y - ref).norm() / ref.norm()).item() < 1e-2, (fmt, M, N, K, cand)
    picked = tune([m], rows=(1, 16))
    assert set(picked) == {tune_key(fmt, m.out_features, m.in_features, r) for r in (1, 16)}


@pytest.mark.skipif(wo.triton is not None, reason="the error of a machine without Triton")
def test_without_triton_the_gpu_formats_say_so():
    with pytest.raises(MillisError, match="Triton is not installed"):
        wo.quantize_and_tune(tiny_llama(), "int4")

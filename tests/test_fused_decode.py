"""The fused decode step (millis.gen.models.fused_decode: millis.gpu.decode_kernels, and decode_gemv at batch 1)
against the torch Llama's own decode step: the same logits and the same KV-cache writes, for batches with an
idle row (a graph bucket's scratch position) and for one row, grouped-query heads that are not a power of two,
a sliding window, Qwen2's qkv biases and the weight-only formats.

The kernels run on CUDA (marked gpu, bf16) or, on the CPU, in Triton's interpreter when Triton is installed
and TRITON_INTERPRET=1 (fp32 / fp16); skipped otherwise. `usable` is checked everywhere.
"""
from __future__ import annotations

import copy
import itertools
import os
from unittest import mock

import pytest
import torch

from millis.gen import cuda_graph
from millis.gen.config import LlamaConfig
from millis.gen.cuda_graph import GraphedDecode
from millis.gen.models.fused_decode import fused_decode, usable
from millis.gen.models.layers import make_batch, setup_caches
from millis.gen.models.llama import Llama
from millis.gpu import decode_kernels as dk

HAS_CUDA = torch.cuda.is_available()
INTERPRET = dk.triton is not None and os.environ.get("TRITON_INTERPRET") == "1" and not HAS_CUDA
MAX_SEQ, SLOTS = 128, 4


def prefilled(heads: int, kv: int, window: int, dtype: torch.dtype, device: str,
              bias: bool = False, quant: str = "") -> tuple[Llama, list[int]]:
    """A tiny Llama whose rows 0..2 hold prompts of 5, 90 and 17 tokens (90: past the first 64-key block, which
    a window skips); row 3 is idle."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, dim=heads * 32, n_layers=2, n_heads=heads, n_kv_heads=kv, hidden_dim=160,
                      max_seq=MAX_SEQ, sliding_window=window, tie_head=True, qkv_bias=bias)
    model = Llama(cfg).eval()
    for name, p in model.named_parameters():
        torch.nn.init.ones_(p) if "norm" in name else torch.nn.init.normal_(p, std=0.08)
    model = model.to(device=device, dtype=dtype)
    if quant:  # GPU weight-only formats: both steps run the same packed weights
        from millis.gpu.weight_only import quantize_weight_only

        quantize_weight_only(model, quant)
    setup_caches(model, SLOTS, MAX_SEQ)
    lengths = [5, 90, 17]
    with torch.inference_mode():
        for slot, n in enumerate(lengths):
            model(make_batch([list(range(3 + slot, 3 + slot + n))], [0], [slot], window, device=device))
    return model, lengths


def step(model: Llama, lengths: list[int], fused: bool, kv_len: int = MAX_SEQ, rows: int = SLOTS):
    """One decode step of rows 0..rows-1 (rows == SLOTS: the idle row 3 at the scratch position)."""
    with mock.patch.object(cuda_graph, "fused_usable", lambda m: False):  # its buffers only: on a GPU the
        gd = GraphedDecode(model, SLOTS, MAX_SEQ, capture=False)  # constructor tunes (layer-kernel compiles)
    ids, pos = [7, 8, 9, 0][:rows], (lengths + [MAX_SEQ - 1])[:rows]
    gd.ids[rows].copy_(torch.tensor(ids)[:, None])
    gd.pos[rows].copy_(torch.tensor(pos)[:, None])
    with torch.inference_mode():
        if fused:
            return fused_decode(model, gd.ids[rows], gd.pos[rows], kv_len, gd.window)
        gd.fused = False
        return gd._forward(rows, kv_len)


# (heads, kv heads, window, qkv bias, weight-only format): GQA 2, GQA 3 (padded to 4), a window, Qwen2's
# biases, and the GPU's weight-only formats (int4: w2's 160 inputs padded to 3 groups of 64)
CASES = [(4, 2, 0, False, ""), (6, 2, 0, False, ""), (4, 1, 8, False, ""), (4, 2, 0, True, ""),
         (4, 2, 0, True, "int8"), (4, 2, 8, False, "int4"), (4, 2, 0, False, "fp8")]


def check(dtype, device, tol):
    """Four rows (one idle: the multi-row kernels) and one row (the batch-1 gemv path)."""
    for (heads, kv, window, bias, quant), rows in itertools.product(CASES, (SLOTS, 1)):
        model, lengths = prefilled(heads, kv, window, dtype, device, bias, quant)
        twin = copy.deepcopy(model)
        want = step(model, lengths, fused=False, rows=rows)
        got = step(twin, lengths, fused=True, rows=rows)
        assert got.shape == want.shape == (rows, 256)
        assert torch.isfinite(got).all()
        real = min(rows, 3)  # the idle row's logits are never read
        err = ((got[:real] - want[:real]).norm() / want[:real].norm()).item()
        assert err < tol, (heads, kv, window, bias, quant, rows, err)
        # the reference's top token is the fused step's top, or within rounding of it (bf16 logits tie often)
        top = want[:real].argmax(-1, keepdim=True)
        slack = tol * want[:real].abs().max()
        assert (got[:real].gather(1, top)[:, 0] >= got[:real].max(-1).values - slack).all()
        lengths = lengths[:real]
        # the same keys and values written at each row's position, within a few roundings of the cache's dtype
        # (bf16 keys near 2 are 0.0078 apart: the H200 saw 0.016 where RoPE rounds at another step)
        for a, b in zip(model.layers, twin.layers):
            for r, p in enumerate(lengths):
                for x, y in ((a.attn.cache.k[r, :, p], b.attn.cache.k[r, :, p]),
                             (a.attn.cache.v[r, :, p], b.attn.cache.v[r, :, p])):
                    assert torch.allclose(x.float(), y.float(), atol=tol, rtol=tol), (heads, kv, window, quant, rows)


def test_usable_only_on_cuda_with_triton_and_power_of_two_heads(monkeypatch):
    model, _ = prefilled(4, 2, 0, torch.float32, "cpu")
    assert not usable(model)  # CPU tensors: the torch forward
    if HAS_CUDA and dk.triton is not None:
        model = model.cuda()
        assert usable(model)
        odd = Llama(LlamaConfig(vocab_size=64, dim=96, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                max_seq=32)).cuda()
        assert not usable(odd)  # 48-wide heads: the kernels' aranges need a power of two
        monkeypatch.setenv("MILLIS_NO_FUSED_DECODE", "1")
        assert not usable(model)


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_fused_step_in_the_interpreter(dtype, tol):
    check(dtype, "cpu", tol)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and dk.triton is not None), reason="needs CUDA and Triton")
def test_fused_step_on_cuda():
    check(torch.bfloat16, "cuda", 3e-2)
    check(torch.float32, "cuda", 1e-4)  # fp32 models' attention dots in IEEE fp32, not TF32


def test_kernels_that_do_not_build_leave_the_torch_step(monkeypatch):
    import millis.gen.cuda_graph as cg

    def broken(*a, **k):
        raise RuntimeError("triton.compiler.errors.CompilationError: arange's range must be a power of 2")
    monkeypatch.setattr(cg, "fused_usable", lambda model: True)
    monkeypatch.setattr(cg, "fused_decode", broken)
    model, lengths = prefilled(4, 2, 0, torch.float32, "cpu")
    with pytest.warns(UserWarning, match="fused decode kernels unavailable"):
        gd = GraphedDecode(model, SLOTS, MAX_SEQ, capture=False)
    assert not gd.fused
    gd.ids[1].fill_(7)
    gd.pos[1].fill_(lengths[0])
    with torch.inference_mode():
        assert gd._forward(1, 64).shape == (1, 256)  # the torch step


def test_a_pdl_launch_that_fails_retries_the_fused_kernels_without_it(monkeypatch):
    """Programmatic dependent launch is the newest part of the fused step (a Triton without launch_pdl, a driver
    that refuses it): its failure turns PDL off and keeps the fused kernels, warned; a second failure without
    it leaves the torch step."""
    import millis.gen.cuda_graph as cg

    monkeypatch.setitem(dk.PDL, "off", "")
    monkeypatch.setattr(dk, "pdl", lambda t: not dk.PDL["off"])  # as on a Hopper GPU with a PDL-capable Triton
    calls = []

    def fails_with_pdl(model, ids, pos, kv_len, window, *rest):
        calls.append(dk.PDL["off"])
        if not dk.PDL["off"]:
            raise RuntimeError("launch_pdl: unexpected keyword argument")
        return torch.zeros(ids.shape[0], 256)

    monkeypatch.setattr(cg, "fused_usable", lambda model: True)
    monkeypatch.setattr(cg, "fused_decode", fails_with_pdl)
    model, _ = prefilled(4, 2, 0, torch.float32, "cpu")
    with pytest.warns(UserWarning, match="programmatic dependent launch unavailable"):
        gd = GraphedDecode(model, SLOTS, MAX_SEQ, capture=False)
    assert gd.fused and "launch_pdl" in dk.PDL["off"] and calls[0] == "" and calls[-1]
    monkeypatch.setitem(dk.PDL, "off", "")
    monkeypatch.setattr(cg, "fused_decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no tl.dot here")))
    with pytest.warns(UserWarning, match="fused decode kernels unavailable"):
        assert not GraphedDecode(model, SLOTS, MAX_SEQ, capture=False).fused


def test_pdl_only_on_hopper_with_a_triton_that_has_it_and_not_when_switched_off(monkeypatch):
    from types import SimpleNamespace as NS

    assert not dk.pdl(torch.zeros(1))  # CPU tensors (and no Triton in CI): never
    assert dk.pdl_launch(torch.zeros(1), True) == {"GDC": False}
    gpu = NS(is_cuda=True, device="cuda:0")  # a tensor on a GPU, as pdl reads it
    monkeypatch.setattr(dk, "triton", object())
    monkeypatch.setattr(dk, "tl", NS(extra=NS(cuda=NS(gdc_wait=None))), raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setitem(dk.PDL, "off", "")
    assert dk.pdl(gpu) and dk.pdl_launch(gpu, True) == {"GDC": True, "launch_pdl": True}
    assert dk.pdl_launch(gpu, False) == {"GDC": False}  # a kernel outside the batch-1 chain
    monkeypatch.setenv("MILLIS_NO_PDL", "1")
    assert not dk.pdl(gpu)
    monkeypatch.delenv("MILLIS_NO_PDL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # Ampere: no PDL
    assert not dk.pdl(gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(dk, "tl", NS(extra=NS(cuda=NS())), raising=False)  # a Triton without gdc_wait
    assert not dk.pdl(gpu)


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
def test_engine_decodes_the_same_tokens_through_the_fused_step():
    """Continuous batching (4 requests through 2 slots, rows joining and leaving, idle bucket rows) with the
    fused step in GraphedDecode's place: the greedy tokens of the torch step."""
    from unittest import mock

    from millis.gen import EngineConfig, SamplingParams
    from millis.gen.engine import Engine, run_all
    from millis.gen.load import build
    from test_gen_engine import PIECES, char_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(PIECES), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=64,
                      hidden_dim=96, bos_id=1, eos_id=2)
    model = Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sd = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    with mock.patch.dict(os.environ, {"MILLIS_NO_KERNELS": "1"}):
        engines = [Engine(build(cfg, sd, char_tokenizer(), "test", EngineConfig(max_batch=2, max_seq=48)),
                          max_prefills_per_step=2) for _ in range(2)]
    for eng, fused in zip(engines, (False, True)):
        eng.decode = GraphedDecode(eng.model, eng.max_batch, eng.max_seq, capture=False, buckets=(1, 2))
        eng.decode.fused = fused
    prompts = [[1, 5, 9, 14], [1, 20, 7], [1, 3], [1, 30, 31, 32, 33, 8]]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    want, got = (run_all(e, prompts, greedy) for e in engines)
    assert got == want and all(len(t) == 12 for t in got)


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
def test_every_gemv_candidate_gives_the_matmul():
    """Each tile `decode_gemv.tune` may pick, for plain, int8 and int4 weights, K past a tile (1100) and past
    a group step (int4's GPS 16 over 2048 / 64 = 32 groups): the torch matmul on the same weights."""
    import torch.nn.functional as F

    from millis.gpu import decode_gemv as dg
    from millis.gpu.weight_only import WeightOnlyLinear, dequantize

    torch.manual_seed(0)
    for K, N in ((576, 192), (1100, 40), (2048, 64)):
        lin = torch.nn.Linear(K, N, bias=False)
        x = torch.randn(K)
        for fmt in ("plain", "int8", "int4"):
            m = lin if fmt == "plain" else WeightOnlyLinear(lin, fmt)
            ref = F.linear(x, lin.weight if fmt == "plain" else dequantize(fmt, m.q, m.scale, m.low, K))
            for c in dg.CANDIDATES:
                err = ((dg.gemv(x, m, config=c) - ref).norm() / ref.norm()).item()
                assert err < 1e-5, (K, N, fmt, c, err)

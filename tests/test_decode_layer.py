"""One kernel a layer at batch 1 (millis.gpu.decode_layer): its five phases against the torch step, the
five-kernel path it replaces kept working behind its switch, and the fallback when its grid barriers give up.

Its arithmetic runs in Triton's interpreter on the CPU (each phase a launch of its own: the interpreter runs
programs one after another, so a barrier would never open) or on CUDA with the barriers (`gpu` marker); the
fallback's logic runs everywhere.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import millis.gen.cuda_graph as cg
from millis.gen.cuda_graph import GraphedDecode
from millis.gpu import decode_kernels as dk
from millis.gpu import decode_layer as dl
from test_fused_decode import HAS_CUDA, INTERPRET, MAX_SEQ, SLOTS, check, prefilled, step


def test_usable_needs_triton_one_format_a_layer_and_no_switch(monkeypatch):
    model, _ = prefilled(4, 2, 0, torch.float32, "cpu")
    assert dl.usable(model) == (dl.triton is not None)
    if dl.triton is None:
        return
    monkeypatch.setenv("MILLIS_NO_DECODE_LAYER", "1")
    assert not dl.usable(model)
    monkeypatch.delenv("MILLIS_NO_DECODE_LAYER")
    from millis.gpu.weight_only import quantize_weight_only

    quantize_weight_only(model, "int8")
    assert dl.usable(model)
    w2 = model.layers[1].ffn.w2
    model.layers[1].ffn.w2 = torch.nn.Linear(w2.in_features, w2.out_features, bias=False)
    assert not dl.usable(model)  # one layer's matmuls in two formats: decode_gemv's five kernels


def test_sync_state_is_made_once_per_model_on_its_device():
    model, _ = prefilled(4, 2, 0, torch.float32, "cpu")
    bars, flag = dl.sync_state(model)
    assert bars.shape == (2, 4) and bars.dtype == torch.int32 and flag.shape == (1,)
    assert dl.sync_state(model)[0] is bars and not dl.failed(model)
    flag.fill_(1)
    assert dl.failed(model)


def test_barriers_that_give_up_leave_the_five_kernel_step(monkeypatch):
    calls = []

    def fused(model, ids, pos, kv_len, window, one_row=None, per_layer=None):
        calls.append(per_layer)
        return torch.zeros(ids.shape[0], 256)

    monkeypatch.setattr(cg, "fused_usable", lambda model: True)
    monkeypatch.setattr(cg, "fused_decode", fused)
    monkeypatch.setattr(cg.decode_layer, "usable", lambda model: True)
    model, _ = prefilled(4, 2, 0, torch.float32, "cpu")
    monkeypatch.setattr(cg.decode_layer, "failed", lambda model: False)
    gd = GraphedDecode(model, SLOTS, MAX_SEQ, capture=False)
    # batch 1 and 2 at the scratch position, then one step both ways: the same logits keep the layer kernel
    assert gd.fused and gd.one_row and gd.per_layer and calls == [True, True, True, False]
    calls.clear()
    assert gd._layer_kernel_agrees() and calls == [True, False]

    def disagrees(model, ids, pos, kv_len, window, one_row=None, per_layer=None):
        return torch.full((ids.shape[0], 256), 1.0 if per_layer else 2.0)

    monkeypatch.setattr(cg, "fused_decode", disagrees)
    with pytest.warns(UserWarning, match="other logits than five"):
        assert not gd._layer_kernel_agrees()

    def near(model, ids, pos, kv_len, window, one_row=None, per_layer=None):  # bf16 sums in another order: ~1%
        return torch.arange(256.0).repeat(ids.shape[0], 1) * (1.01 if per_layer else 1.0)

    def flipped(model, ids, pos, kv_len, window, one_row=None, per_layer=None):  # close, but another top token
        x = torch.ones(ids.shape[0], 256)
        x[:, 0 if per_layer else 1] += 0.01
        return x

    monkeypatch.setattr(cg, "fused_decode", near)
    assert gd._layer_kernel_agrees() and gd.layer_agreement["same_top_token"]
    monkeypatch.setattr(cg, "fused_decode", flipped)
    with pytest.warns(UserWarning, match="other logits than five"):
        assert not gd._layer_kernel_agrees()
    assert gd.layer_agreement["relative_error"] < 1e-3 and not gd.layer_agreement["same_top_token"]
    monkeypatch.setattr(cg, "fused_decode", fused)
    # a barrier that gives up while decoding: its flag, copied to the host after the step, is read at the next
    # batch-1 step, which goes back to five kernels a layer
    gd.per_layer = True
    gd.flag_host.fill_(1)
    with pytest.warns(UserWarning, match="gave up while decoding"):
        gd([7], [5], [0])
    assert not gd.per_layer and calls[-1] is False and not gd.flag_host[0]
    calls.clear()
    monkeypatch.setattr(cg.decode_layer, "failed", lambda model: True)  # a grid that was not all resident
    with pytest.warns(UserWarning, match="one kernel a layer unavailable"):
        gd = GraphedDecode(model, SLOTS, MAX_SEQ, capture=False)
    assert gd.fused and not gd.per_layer and calls == [True, True, False, False]


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
def test_each_phase_in_the_interpreter_matches_the_torch_step():
    for heads, kv, window, bias, quant in [(4, 2, 0, True, ""), (6, 2, 8, False, "int4"), (4, 1, 0, False, "int8")]:
        model, lengths = prefilled(heads, kv, window, torch.float32, "cpu", bias, quant)
        twin = copy.deepcopy(model)
        want = step(model, lengths, fused=False, rows=1)
        got = step(twin, lengths, fused=True, rows=1)  # decode_layer: usable here
        assert dl.usable(twin)
        assert ((got - want).norm() / want.norm()).item() < 1e-4, (heads, kv, window, quant)
        for a, b in zip(model.layers, twin.layers):  # the row's key and value written at its position
            assert torch.allclose(a.attn.cache.k[0, :, lengths[0]], b.attn.cache.k[0, :, lengths[0]], atol=1e-5)
            assert torch.allclose(a.attn.cache.v[0, :, lengths[0]], b.attn.cache.v[0, :, lengths[0]], atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter on the CPU: needs triton and TRITON_INTERPRET=1")
def test_the_five_kernel_step_behind_the_switch_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("MILLIS_NO_DECODE_LAYER", "1")
    check(torch.float32, "cpu", 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and dk.triton is not None), reason="needs CUDA and Triton")
def test_layer_kernel_in_a_cuda_graph_matches_the_five_kernel_step(monkeypatch):
    """The barriers open on the GPU (the flag stays clear), the counters reset between replays, and two
    replayed steps give the five-kernel step's logits."""
    from millis.gen.models.fused_decode import layer_us

    model, lengths = prefilled(4, 2, 0, torch.bfloat16, "cuda")
    twin = copy.deepcopy(model)
    timed = layer_us(model, 256, 0)  # the engine's measured choice between the two
    assert timed["per_layer"] > 0 and timed["five_kernels"] > 0 and not dl.failed(model)
    monkeypatch.setattr(cg, "layer_us", lambda *a: {"per_layer": 1.0, "five_kernels": 2.0})  # this model: one kernel
    gd = GraphedDecode(model, SLOTS, MAX_SEQ)
    assert gd.per_layer and not dl.failed(model)
    monkeypatch.setenv("MILLIS_NO_DECODE_LAYER", "1")
    ref = GraphedDecode(twin, SLOTS, MAX_SEQ)
    assert not ref.per_layer
    p = lengths[0]
    for t in (7, 9):  # two steps: the second replay needs the counters the first left zeroed again
        got, want = gd([t], [p], [0]), ref([t], [p], [0])
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 3e-2
        p += 1
    assert not dl.failed(model)


@pytest.mark.skipif(dl.triton is None or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton, compiling (its wheel brings ptxas: no GPU needed), not interpreting")
@pytest.mark.parametrize("fmt", [0, 2])
def test_layer_kernel_compiles_for_hopper_with_its_barriers(fmt):
    """Compiled for sm_90 without a GPU: what the interpreter cannot check. Each barrier arrives with a
    release atomic and polls with acquire loads from one thread; loads of what other programs wrote bypass
    L1; PDL's wait and trigger are in."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = dl.DEFAULT
    consts = dict(FMT=fmt, HAS_B=fmt == 0, G=3, GP=16, HS=64, BL=64, PREC="tf32", BN=cfg["BN"], BK=cfg["BK"],
                  GPS=cfg["GPS"], GROUP_=64, PH0=0, PH1=5, SYNC=True, CM=".cg", MAX_SPIN_=dl.MAX_SPIN, PROGS=132,
                  PRE=fmt != 2, GDC=True)
    weights = "*bf16" if fmt == 0 else "*u8"
    sig = {}
    for n in inspect.signature(dl._layer_kernel.fn).parameters:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("bar_ptr", "flag_ptr"):
            sig[n] = "*i32"
        elif n == "pos_ptr":
            sig[n] = "*i64"
        elif n in ("cos_ptr", "sin_ptr") or (n[0] in "sl" and n.endswith("_ptr") and fmt):
            sig[n] = "*fp32"
        elif n in ("wq_ptr", "wo_ptr", "wu_ptr", "wd_ptr"):
            sig[n] = weights
        elif n.endswith("_ptr"):
            sig[n] = "*bf16"
        else:
            sig[n] = "fp32" if n in ("eps", "scale") else "i32"
    src = ASTSource(dl._layer_kernel, sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
    ptx = dl.triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg["num_warps"], "launch_pdl": True}).asm["ptx"]
    # an arrival: a release add, `atom` where its result is read, `red` where not (Triton 3.9 emits that)
    arrivals = [line.strip() for line in ptx.splitlines()
                if "atom.global.gpu.release.add" in line or "red.global.gpu.release.add" in line]
    assert len(arrivals) == 4 and all(a.startswith("@%p") for a in arrivals)  # a barrier: one thread arrives
    assert ptx.count("ld.global.gpu.acquire") >= 4        # its polls
    assert "ld.global.cg" in ptx and "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx


def llama_1b_like(layers: int = 3) -> "torch.nn.Module":
    """A Llama with Llama-3.2-1B's layer shapes (2048 wide, 32 / 8 heads of 64, 8192 hidden), a few layers:
    tiles over every program of a large GPU, phases long enough for a missing barrier to show."""
    from millis.gen.config import LlamaConfig
    from millis.gen.models.layers import setup_caches
    from millis.gen.models.llama import Llama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, dim=2048, n_layers=layers, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                      max_seq=MAX_SEQ, tie_head=True)
    model = Llama(cfg).eval()
    for name, prm in model.named_parameters():
        torch.nn.init.ones_(prm) if "norm" in name else torch.nn.init.normal_(prm, std=0.02)
    model = model.to(device="cuda", dtype=torch.bfloat16)
    setup_caches(model, SLOTS, MAX_SEQ)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and dk.triton is not None), reason="needs CUDA and Triton")
def test_layer_kernel_at_llama_1b_width_over_many_replays(monkeypatch):
    """Realistic widths, a prompt, then 24 replayed steps: the same greedy tokens and logits as five kernels
    a layer; the barriers never gave up."""
    model = llama_1b_like()
    twin = copy.deepcopy(model)
    monkeypatch.setattr(cg, "layer_us", lambda *a: {"per_layer": 1.0, "five_kernels": 2.0})
    gd = GraphedDecode(model, SLOTS, MAX_SEQ)
    monkeypatch.setenv("MILLIS_NO_DECODE_LAYER", "1")
    ref = GraphedDecode(twin, SLOTS, MAX_SEQ)
    assert gd.per_layer and not ref.per_layer
    tok = 5
    for p in range(24):
        got, want = gd([tok], [p], [0]), ref([tok], [p], [0])
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 3e-2, p
        tok = int(want.argmax())
    torch.cuda.synchronize()
    assert not dl.failed(model) and not gd.flag_host[0]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and dk.triton is not None), reason="needs CUDA and Triton")
def test_a_barrier_that_gives_up_sets_the_flag_and_poisons_the_step(monkeypatch):
    """The negative control: polls capped at zero, the programs that arrive before the last leave at once:
    the flag is raised and the residual stream is NaN (never a plausible wrong answer)."""
    model = llama_1b_like(layers=1)
    monkeypatch.setattr(dl, "MAX_SPIN", 0)
    x = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    p = torch.full((1,), MAX_SEQ - 1, dtype=torch.long, device="cuda")
    dl.sync_state(model)[0].zero_()
    dl.layer_step(x, model.layers[0], 0, model, p, 128, 0, dl.DEFAULT)
    torch.cuda.synchronize()
    assert dl.failed(model) and torch.isnan(x).any()

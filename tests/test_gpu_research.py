"""The research layers of bench/gpu_research (not shipped by millis): they must still compute the
encoder they claim to, so bench/gpu_encoders.py measures them against the right thing.
The tanh-GELU layer runs on the CPU; the rest needs CUDA (Triton, Inductor) and skips without it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from millis.common.config import Shape
from millis.common.dtypes import torch_dtype
from millis.common.errors import MillisError
from millis.encoder.source import Pooling
from millis.gpu import RunOptions, from_hf

from test_gpu import INPUTS, minilm_errors, needs_cuda, runtime

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
from gpu_research import gemm  # noqa: E402
from gpu_research.layers import research_encoder  # noqa: E402


def test_gelu_tanh_layer_is_close_but_not_exact():
    """The tanh GELU changes the function a little: close to HF, measurably not equal (weights large
    enough that the FFN's pre-activations are O(1), where the two GELUs differ)."""
    from transformers import BertConfig, BertModel

    from millis.encoder.tasks import TaskModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              vocab_size=100, initializer_range=0.2), add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 16))
    f = [ids, torch.ones_like(ids), torch.zeros_like(ids)]
    pooling = Pooling(normalize=True)
    with torch.inference_mode():
        ref = TaskModel(hf, "embed", pooling, INPUTS)(*f).numpy()
        exact = from_hf(hf, "embed", pooling, RunOptions(dtype="fp32", fuse="torch", device="cpu"))(*f).numpy()
        tanh = research_encoder(hf, "embed", pooling, "gelu-tanh", dtype="fp32", device="cpu")(*f).numpy()
    np.testing.assert_allclose(exact, ref, atol=1e-5)
    diff = np.abs(tanh - ref).max()
    assert 1e-5 < diff < 2e-2, diff


def test_research_encoder_rejects_unknown_layers():
    with pytest.raises(MillisError, match="research layer"):
        research_encoder("unused", "embed", Pooling(), "magic")
    with pytest.raises(MillisError, match="CUDA"):
        research_encoder("unused", "embed", Pooling(), "compile", device="cpu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("M", [16, 128, 300, 512])
def test_triton_gemms_match_torch(dtype, M):
    dt = torch_dtype(dtype)
    g = torch.Generator(device="cuda").manual_seed(M)
    for N, K in ((768, 768), (3072, 768), (768, 3072), (1536, 384), (32, 64)):
        x = torch.randn(M, K, device="cuda", generator=g).to(dt)
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dt)
        b = torch.randn(N, device="cuda", generator=g).to(dt)
        ref = x.float() @ w.float().T
        parts = gemm.linear_partials(x, w)
        assert parts.shape == (gemm.pick(M, N, K, split=True).splits, M, N) and parts.dtype == torch.float32
        assert ((parts.sum(0) - ref).norm() / ref.norm()) < 1e-3
        ref_g = torch.nn.functional.gelu(ref + b.float())
        out = gemm.linear_gelu(x, w, b)
        assert out.dtype == dt and ((out.float() - ref_g).norm() / ref_g.norm()) < (2e-3 if dtype == "fp16" else 1e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_gelu_epilogue_is_the_tanh_gelu():
    """The gelu-tanh layer relies on CUDA's _addmm_activation computing tanh-GELU (its CPU path
    writes that out explicitly)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, w, b = (torch.randn(*s, device="cuda", generator=g).half() for s in ((128, 384), (1536, 384), (1536,)))
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
    h = x.float() @ w.float().T + b.float()
    tanh, erf = torch.nn.functional.gelu(h, approximate="tanh"), torch.nn.functional.gelu(h)
    assert (got - tanh).norm() / tanh.norm() < 2e-3
    assert (got - tanh).abs().max() < (got - erf).abs().max() or (tanh - erf).abs().max() < 1e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,layer", [("fp16", "triton-gemm"), ("bf16", "triton-gemm"), ("fp16", "gelu-tanh"),
                                         ("fp16", "compile")])
def test_research_layers_against_hf(dtype, layer):
    results = minilm_errors(lambda model, task, pooling: runtime(
        research_encoder(model, task, pooling, layer, dtype), task, pooling=pooling, buckets=(Shape(4, 64),)))
    limit = 1e-2 if dtype == "fp16" else 4e-2
    assert results["classify"] < limit and results["embed"] < limit, results

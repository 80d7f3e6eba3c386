"""millis's int8 on CPU: Llama-family models as int8 blocks (int16 activations) on the native kernels,
GPT-2 on the per-row kernel (millis/kernels/qgemm.c): close to fp32, exact per row whatever the
batch, odd shapes padded correctly; the torch fallback; and the mask-free attention paths of make_batch."""
import pytest
import torch

from millis.kernels.cpu_int8 import Int8Linear, library, why_unavailable
from millis.gen.models.layers import make_batch

needs_kernel = pytest.mark.skipif(library() is None, reason=f"int8 kernel unavailable: {why_unavailable()}")


@needs_kernel
@pytest.mark.parametrize("k,n,bias", [(768, 2304, True), (100, 37, False), (32, 4, True), (3072, 50, True)])
def test_int8_linear_close_to_fp32_and_batch_invariant(k, n, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    q = Int8Linear(lin)
    x = torch.randn(5, 3, k)
    with torch.inference_mode():
        ref, got = lin(x), q(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
        # one scale per activation row: a row's output is bit-identical alone and in any batch
        assert torch.equal(q(x[2:3, 1:2]), got[2:3, 1:2])
        assert torch.equal(q(x[:, 1]), got[:, 1])


def test_int8_torch_backend_and_fallback(monkeypatch):
    from millis.kernels import cpu_int8
    from millis.kernels.quant import quantize_int8

    lin = torch.nn.Sequential(torch.nn.Linear(16, 8))
    assert quantize_int8(lin, "torch") == "torch-dynamic" and not isinstance(lin[0], Int8Linear)
    monkeypatch.setattr(cpu_int8, "library", lambda: None)
    with pytest.warns(UserWarning, match="int8 kernel is unavailable"):
        assert quantize_int8(torch.nn.Sequential(torch.nn.Linear(16, 8))) == "torch-dynamic"
    with pytest.raises(RuntimeError, match="unavailable"):
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(16, 8)), "millis")


def test_mask_free_batches_equal_masked_ones():
    """Prefill from 0 (causal) and decode at one shared position (all keys) skip the mask; the logits
    equal those of the same rows given an explicit mask (another slot order forces one)."""
    from test_gen_engine import engine

    eng = engine(max_batch=4, max_seq=48)
    prompt = [1, 5, 9, 12, 7, 3]
    with torch.inference_mode():
        fast = make_batch([prompt], [0], [0], last_only=False)
        assert fast.mask is None and fast.causal and fast.start == 0
        a = eng.model(fast)[0]
        slow = make_batch([prompt, prompt], [0, 0], [2, 1], last_only=False)  # slots not consecutive
        assert slow.start is None
        b = eng.model(slow)[1]
        assert torch.allclose(a, b, atol=1e-5)
        step = make_batch([[4], [4]], [6, 6], [0, 1])  # decode: both rows at position 6, no mask
        assert step.mask is None and not step.causal and step.start == 6
        c = eng.model(step)[:, -1]
        d = eng.model(make_batch([[4], [4]], [6, 6], [2, 1]))[:, -1]  # via index writes and a mask
        assert torch.allclose(c, d, atol=1e-5)
        assert make_batch([[4], [4]], [6, 5], [0, 1]).mask is not None          # different positions
        assert make_batch([[4]], [6], [0], window=4).mask is not None            # the window bites


@needs_kernel
def test_engine_int8_tokens_do_not_depend_on_batch():
    from test_gen_engine import GREEDY, engine, run

    from millis.gen.models.native_llama import INT8, TYPE_IDS, NativeLlama

    eng = engine(quant="int8")  # a Llama: millis's int8 blocks on the native kernels, the head included
    int8 = TYPE_IDS[INT8]
    assert isinstance(eng.model, NativeLlama) and eng.model.m.head.type == int8 and eng.model.layers[0].q.type == int8
    prompts = ["the cat", "in a", "he"]
    alone = [run(eng, [p], GREEDY)[0]["ids"] for p in prompts]
    assert [r["ids"] for r in run(eng, prompts, GREEDY)] == alone


@needs_kernel
def test_engine_int8_close_to_fp32():
    """The kernel's logits at every decoded position, teacher-forced on fp32's greedy run, within the
    int8 bounds of test_gen_engine.PRECISION_TOL (the real models: test_gen_reference.py)."""
    from test_gen_engine import assert_close_to_fp32, engine, precision

    ref, eng = engine(), engine(quant="int8")
    assert precision(eng) == "int8"
    assert_close_to_fp32(ref, eng, [ref.tok.encode(p) for p in ("the cat", "in a", "he", "an the he")], 20)

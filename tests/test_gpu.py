"""The compact encoder (millis.gpu) and the CUDA-graph runtime.

The encoder's math runs on the CPU in fp32, so CI checks it against HF transformers (no CUDA there).
Tests marked `gpu` need CUDA and skip cleanly without it: fp16 / bf16 against the fp32 HF reference,
the Triton kernels against torch, graph replay (batched = single, padded bucket = exact length).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.gpu import RunOptions, from_hf
from millis.runtimes.cuda import CudaGraphRuntime, pick_bucket
from millis.encoder.source import Pooling, inspect_dir
from millis.common.samples import sample_texts

from conftest import reference_outputs

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUT = {"classify": "logits", "embed": "embedding"}
# fp16 / bf16 against fp32: max |diff| on the tiny model's logits / unit embeddings
TOL = {"fp16": 1e-2, "bf16": 4e-2}
CPU = RunOptions(dtype="fp32", fuse="torch", device="cpu")


@pytest.fixture(scope="module")
def bert_dir():
    from millis.encoder.tiny import build_tiny

    return build_tiny("bert")


def texts(n: int = 7) -> list[str]:
    # mixed lengths, so every batch has padding
    t = sample_texts()
    return [t[i] if i % 3 else t[i] + " " + t[i + 20] + " " + t[i + 40] for i in range(n)]


def feeds_for(model_dir, items: list[str], pad_to: int = 0) -> dict[str, np.ndarray]:
    from millis.encoder.text import TextEncoder

    return TextEncoder(model_dir, INPUTS, 128).encode(items, pad_to=pad_to).feeds


def as_torch(feeds, device="cpu"):
    return [torch.from_numpy(feeds[n]).to(device) for n in INPUTS]


def runtime(model, task, **kw) -> CudaGraphRuntime:
    pooling = kw.pop("pooling", Pooling(normalize=True) if task == "embed" else Pooling())
    return CudaGraphRuntime(model, "cuda-graph", INPUTS, OUT[task], task, pooling, **kw)


# ---- CPU: the encoder's math (fp32) against HF ----

@pytest.mark.parametrize("task", ["classify", "embed"])
def test_encoder_fp32_matches_hf_on_cpu(bert_dir, task):
    items = texts()
    enc = from_hf(bert_dir, task, inspect_dir(bert_dir).pooling, CPU)
    with torch.inference_mode():
        out = enc(*as_torch(feeds_for(bert_dir, items))).numpy()
    ref = reference_outputs(bert_dir, task, items)  # one text at a time, no padding at all
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["cls", "max", "mean"])
def test_pooling_modes_match_task_model(bert_dir, mode):
    from dataclasses import replace

    from millis.encoder.tasks import load_task_model

    pooling = Pooling(mode=mode, normalize=mode != "max")
    hf = load_task_model(replace(inspect_dir(bert_dir), pooling=pooling), "embed")
    feeds = as_torch(feeds_for(bert_dir, texts()))
    with torch.inference_mode():
        ref = hf(*feeds).numpy()
        out = from_hf(hf, "embed", pooling, CPU)(*feeds).numpy()  # from the in-memory model
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("task, mode", [("classify", "mean"), ("embed", "cls"), ("embed", "mean")])
def test_first_token_heads_run_the_last_layer_at_the_first_rows(bert_dir, task, mode, monkeypatch):
    """A head that reads only the [CLS] rows (a classifier, CLS pooling) runs the last layer at those rows alone
    (last_layer_first_rows), and gives what the whole last layer gives; mean pooling runs the whole layer."""
    from functools import partial

    import millis.gpu.encoder as genc

    calls = []
    real = genc.last_layer_first_rows
    monkeypatch.setattr(genc, "last_layer_first_rows", lambda *a: calls.append(1) or real(*a))
    enc = from_hf(bert_dir, task, Pooling(mode=mode, normalize=True), CPU)
    feeds = as_torch(feeds_for(bert_dir, texts()))
    with torch.inference_mode():
        first = enc(*feeds).numpy()
        assert len(calls) == (mode == "cls" or task == "classify")
        enc.layer = partial(genc.layer_forward)  # a swapped layer (a calibration, a bench) runs every row
        whole = enc(*feeds).numpy()
    assert len(calls) <= 1 and first.shape == whole.shape
    np.testing.assert_allclose(first, whole, atol=2e-6)


def test_encoder_rejects_what_it_cannot_run(tiny_dirs, tmp_path):
    from conftest import unrunnable_deberta

    with pytest.raises(MillisError, match="does not run DeBERTa with share_att_key false"):
        from_hf(unrunnable_deberta(tiny_dirs, tmp_path), "embed", Pooling(), CPU)
    with pytest.raises(MillisError, match="dtype"):
        RunOptions(dtype="fp8")
    for fuse in ("magic", "compile"):  # compile: a research layer now (bench/gpu_research)
        with pytest.raises(MillisError, match="fuse"):
            RunOptions(fuse=fuse)
    with pytest.raises(MillisError, match="task"):
        from_hf(tiny_dirs["bert"], "generate", Pooling(), CPU)


def test_encoder_needs_a_classifier_for_classify(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100), add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(MillisError, match="sequence-classification"):
        from_hf(tmp_path, "classify", Pooling(), CPU)
    assert from_hf(tmp_path, "embed", Pooling(), CPU).out_dim == 32


def test_pick_bucket():
    buckets = (Shape(1, 16), Shape(1, 128), Shape(8, 32), Shape(8, 128))
    assert pick_bucket(buckets, 1, 16) == Shape(1, 16)
    assert pick_bucket(buckets, 1, 17) == Shape(1, 128)   # 128 padded tokens beat 8x32 = 256
    assert pick_bucket(buckets, 2, 20) == Shape(8, 32)
    assert pick_bucket(buckets, 3, 100) == Shape(8, 128)
    assert pick_bucket(buckets, 9, 16) is None             # no bucket holds 9 rows: eager
    assert pick_bucket(buckets, 1, 129) is None


def test_runtime_pads_into_buckets_on_cpu(bert_dir):
    """The runtime's padding path without graphs: padded rows and tokens change nothing."""
    items = texts(3)
    ref = reference_outputs(bert_dir, "classify", items)
    rt = runtime(bert_dir, "classify", dtype="fp32", fuse="torch", device="cpu", buckets=(Shape(4, 64),))
    assert rt.graphs == 0 and rt.cold_start_s > 0
    out = rt.run(feeds_for(bert_dir, items))["logits"]  # (3, 32) -> bucket (4, 64)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    big = feeds_for(bert_dir, texts(6))                   # 6 rows: no bucket, eager at (6, T)
    np.testing.assert_allclose(rt.run(big)["logits"][:3], ref, atol=1e-5)


def test_runtime_bad_inputs(bert_dir):
    rt = runtime(bert_dir, "embed", dtype="fp32", fuse="torch", device="cpu", buckets=(Shape(2, 64),))
    f = feeds_for(bert_dir, texts(2))
    with pytest.raises(MillisError, match="attention_mask"):
        rt.run({"input_ids": f["input_ids"]})
    with pytest.raises(MillisError, match="shape"):
        rt.run({**f, "attention_mask": f["attention_mask"][:, :-1]})
    with pytest.raises(MillisError, match="positions"):
        long = np.ones((1, 200), dtype=np.int64)
        rt.run({"input_ids": long, "attention_mask": long})
    with pytest.raises(MillisError, match="positions"):
        runtime(bert_dir, "embed", dtype="fp32", fuse="torch", device="cpu", buckets=(Shape(1, 256),))
    out = rt.run({n: a for n, a in f.items() if n != "token_type_ids"})["embedding"]  # types default to 0
    np.testing.assert_allclose(out, rt.run(f)["embedding"], atol=1e-6)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a machine without CUDA gives")
def test_cuda_runtime_without_cuda_is_a_clear_error(bert_dir):
    from millis.runtimes.registry import open_runtime

    with pytest.raises(MillisError, match="CUDA"):
        open_runtime("cuda", bert_dir, "cuda-fp16", INPUTS, "logits", {"task": "classify", "buckets": ["b1xs16"]})


# ---- CUDA ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("hidden", [32, 384, 768])
def test_triton_kernels_match_torch(dtype, hidden):
    from millis.common.dtypes import torch_dtype
    from millis.gpu import kernels

    dt, dev = torch_dtype(dtype), "cuda"
    g = torch.Generator(device=dev).manual_seed(hidden)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=g).to(dt)

    B, T, V = 3, 48, 100
    ids = torch.randint(0, V, (B, T), device=dev, generator=g)
    types = torch.randint(0, 2, (B, T), device=dev, generator=g)
    word, pos, typ, w, b = rnd(V, hidden), rnd(64, hidden), rnd(2, hidden), rnd(hidden), rnd(hidden)
    h, res, ffn, fb = rnd(B * T, hidden), rnd(B * T, hidden), rnd(B * T, 4 * hidden), rnd(4 * hidden)
    mask = (torch.rand(B, T, device=dev, generator=g) > 0.3).long()
    f32 = [t.float() for t in (word, pos, typ, w, b)]
    x, bias = kernels.embed_ln(ids, types, mask, word, pos, typ, w, b, 1e-12)
    x_ref, _ = kernels.embed_ln_torch(ids, types, mask, *f32, 1e-12)
    assert torch.equal(bias, kernels.mask_bias(mask, dt)) and bias.shape == (B, 1, 1, T)
    pairs = [
        (x, x_ref),
        (kernels.add_ln(h, b, res, w, b, 1e-12), kernels.add_ln_torch(h.float(), b.float(), res.float(),
                                                                       w.float(), b.float(), 1e-12)),
        (kernels.bias_gelu(ffn.clone(), fb), kernels.bias_gelu_torch(ffn.float(), fb.float())),
    ]
    # strided views (every other row of a wider buffer, a transposed id matrix): the same as dense inputs
    wide, ids_t = rnd(B * T, 2 * hidden), ids.t().contiguous().t()
    pairs += [(kernels.embed_ln(ids_t, types, mask, word, pos, typ, w, b, 1e-12)[0], x_ref),
              (kernels.add_ln(wide[:, ::2], b, res, w, b, 1e-12),
               kernels.add_ln_torch(wide[:, ::2].float(), b.float(), res.float(), w.float(), b.float(), 1e-12)),
              (kernels.bias_gelu(wide[:, ::2], b), kernels.bias_gelu_torch(wide[:, ::2].float(), b.float()))]
    for got, ref in pairs:
        assert got.dtype == dt and got.shape == ref.shape
        err = (got.float() - ref).norm() / ref.norm()
        assert torch.isfinite(got).all() and err < (2e-3 if dtype == "fp16" else 1e-2), err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("task", ["classify", "embed"])
def test_graphs_match_hf_fp32(bert_dir, dtype, task):
    items = texts()
    ref = reference_outputs(bert_dir, task, items)
    buckets = (Shape(1, 16), Shape(1, 64), Shape(8, 128))  # the batch (7, 96) pads into (8, 128)
    rt = runtime(bert_dir, task, dtype=dtype, buckets=buckets)
    assert rt.graphs == 3 and 0 < rt.cold_start_s < 120
    out = rt.run(feeds_for(bert_dir, items))[OUT[task]]
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=TOL[dtype])
    single = np.concatenate([rt.run(feeds_for(bert_dir, [t]))[OUT[task]] for t in items])
    np.testing.assert_allclose(single, out, atol=TOL[dtype])  # batched = single


@pytest.mark.gpu
@needs_cuda
def test_padded_bucket_equals_exact_length(bert_dir):
    from millis.gpu.encoder import from_hf as build

    enc = build(bert_dir, "embed", Pooling(normalize=True), RunOptions(dtype="fp16"))
    f = feeds_for(bert_dir, texts(3), pad_to=48)
    exact = runtime(enc, "embed", buckets=(Shape(3, 48),))
    padded = runtime(enc, "embed", buckets=(Shape(8, 128),))
    a, b = exact.run(f)["embedding"], padded.run(f)["embedding"]
    np.testing.assert_allclose(a, b, atol=5e-3)
    # eager (no bucket holds 12 rows) agrees with the graphs too
    f12 = feeds_for(bert_dir, texts(12))                       # (12, 96)
    np.testing.assert_allclose(padded.run(f12)["embedding"][:3], a, atol=5e-3)
    # a replay reads the new inputs (no stale buffers): another batch gets its own answer
    g = feeds_for(bert_dir, texts(9)[6:], pad_to=48)
    other = padded.run(g)["embedding"]
    np.testing.assert_allclose(other, exact.run(g)["embedding"], atol=5e-3)
    assert np.abs(other - a).max() > 0.05
    np.testing.assert_allclose(padded.run(f)["embedding"], b, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_dense_graph_only_for_full_batches(bert_dir):
    """dense=True adds unmasked twins; they must give what the masked graphs give on full batches,
    and padded batches must not reach them."""
    f = feeds_for(bert_dir, texts(3), pad_to=48)
    full = {n: np.ascontiguousarray(a[:, :8]) for n, a in f.items()}  # 8 real tokens in every row
    full["attention_mask"][:] = 1
    rt = runtime(bert_dir, "embed", buckets=(Shape(3, 8), Shape(3, 48)), dense=True)
    masked = runtime(rt.encoder, "embed", buckets=(Shape(3, 8), Shape(3, 48)))
    assert rt.graphs == 4 and masked.graphs == 2
    np.testing.assert_allclose(rt.run(full)["embedding"], masked.run(full)["embedding"], atol=2e-3)
    np.testing.assert_allclose(rt.run(f)["embedding"], masked.run(f)["embedding"], atol=0)  # padded: masked graph
    dev = [torch.from_numpy(full[n]).cuda() for n in INPUTS]
    np.testing.assert_allclose(rt.forward(*dev, full=True).cpu().numpy(), masked.run(full)["embedding"], atol=2e-3)


def random_bert(layers: int, hidden: int, heads: int, inter: int, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, num_labels=4)
    return BertForSequenceClassification(cfg).eval()


def minilm_errors(build) -> dict[str, float]:
    """||out - ref|| / ||ref|| per task against HF fp32 at MiniLM widths (H=384: not a power of two),
    the real depth, random weights, a padded (4, 64) batch. build(model, task, pooling) -> runtime."""
    from millis.encoder.tasks import TaskModel

    hf = random_bert(6, 384, 12, 1536)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (4, 64), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    mask[3, 9:] = 0
    types = torch.zeros_like(ids)
    results = {}
    for task, pooling in (("classify", Pooling()), ("embed", Pooling(normalize=True))):
        model = hf if task == "classify" else hf.bert  # embed: the bare BertModel, as AutoModel loads it
        with torch.inference_mode():
            ref = TaskModel(model, task, pooling, INPUTS).eval()(ids, mask, types).numpy()
        rt = build(model, task, pooling)
        out = rt.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()})
        results[task] = float(np.linalg.norm(out[OUT[task]] - ref) / np.linalg.norm(ref))
    return results


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,fuse", [("fp16", "triton"), ("bf16", "triton"), ("fp16", "torch")])
def test_minilm_shape_against_hf(dtype, fuse):
    results = minilm_errors(lambda model, task, pooling: runtime(model, task, pooling=pooling, dtype=dtype, fuse=fuse,
                                                                 buckets=(Shape(4, 64),)))
    limit = 1e-2 if dtype == "fp16" else 4e-2
    assert results["classify"] < limit and results["embed"] < limit, results


def test_minilm_shape_fp32_on_cpu():
    """The CPU stand-in of the test above: the same MiniLM-shaped model, padded rows included, through
    the runtime's padding path (bucket (4, 64)) in fp32 on CPU, equals HF fp32 up to summation order."""
    results = minilm_errors(lambda model, task, pooling: runtime(model, task, pooling=pooling, dtype="fp32",
                                                                 fuse="torch", device="cpu", buckets=(Shape(4, 64),)))
    assert results["classify"] < 1e-5 and results["embed"] < 1e-5, results

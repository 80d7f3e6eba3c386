"""MPNet (all-mpnet-base-v2's family) on millis's compact encoder: BERT's layers under MPNet's names, positions from
row 2 (HF's padding index is 1 whatever the config says), no token types, and a learned bias per relative-position
bucket added to every attention score (the native kernels' fp32 and int8 attention; SDPA's additive mask in the CUDA
encoder's torch form; the bf16 attention adds none, so a bf16 MPNet keeps fp32 attention). Every native precision against HF: tests/test_variants.py; here texts up to the last
position, the token split of two threads, the [CLS]-only last layer of a classifier, and the bucket map itself."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import compact_cpu_outputs, native_fp32, reference_outputs
from millis.artifact.model import run_texts
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder.bert_weights import relative_bias_table
from millis.encoder.native import NativeBert
from millis.encoder.source import resolve
from millis.gpu.encoder import RunOptions, from_hf
from millis.kernels.native import native_isa

CPU = RunOptions(dtype="fp32", fuse="torch", device="cpu")


def test_relative_buckets_are_hfs():
    """The (heads, span) table's entry mid + q - k is HF's bias for query q and key k at every distance, the
    float32 steps of its log buckets included (a distance at a bucket's edge lands where torch puts it)."""
    import torch
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    rel = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    for positions in (9, 130, 512):
        table, mid = relative_bias_table(rel, positions)
        q, k = np.meshgrid(np.arange(positions), np.arange(positions), indexing="ij")
        want = rel[MPNetEncoder.relative_position_bucket(torch.from_numpy(k - q)).numpy()]  # (q, k, heads)
        np.testing.assert_array_equal(table[:, mid + q - k].transpose(1, 2, 0), want)
        assert table.shape == (3, 2 * mid + 1) and mid == positions - 1 + 16  # 16 spare entries each side


@pytest.mark.parametrize("task,threads", [("classify", 2), ("embed", 2), ("embed", 1)])
def test_mpnet_on_the_native_kernels_matches_hf(tmp_path, tiny_dirs, task, threads):
    import torch

    if native_isa() is None:
        pytest.skip("no native kernels here")
    texts = sample_texts()[:6] + [" ".join(sample_texts() * 3)]  # the last: cut at 128 tokens, the last position
    src, enc, native = native_fp32(tiny_dirs["mpnet"], task, tmp_path, threads)
    assert src.max_length == 128 and enc.encode(texts).lengths[-1] == 128
    want = reference_outputs(src.path, task, texts)
    np.testing.assert_allclose(run_texts(native, enc, texts).outputs, want, atol=1e-4)  # padded batches of 8
    np.testing.assert_allclose(np.concatenate([run_texts(native, enc, [t]).outputs for t in texts]), want, atol=1e-4)
    np.testing.assert_allclose(compact_cpu_outputs(src.path, task, src.pooling, enc, texts), want, atol=1e-4)
    compact = from_hf(src.path, task, src.pooling, CPU)
    compact.rel_qk.zero_()  # the bias matters: without it the outputs move
    with torch.inference_mode():
        off = compact(*(torch.from_numpy(f) for f in enc.encode(texts[-1:]).feeds.values())).numpy()
    assert np.abs(off - want[-1:]).max() > 1e-3  # (10x the tolerance above)


@pytest.fixture(scope="module")
def mpnet_head32(tmp_path_factory, tiny_dirs):
    """tiny:mpnet's tokenizer under an MPNet of head size 32 (hidden 64, 2 heads): the int8 attention's sizes."""
    import json
    import shutil

    import torch
    from transformers import AutoModel, MPNetConfig

    d = tmp_path_factory.mktemp("mp") / "mpnet-hd32"
    shutil.copytree(tiny_dirs["mpnet"], d)
    cfg = {**json.loads((d / "config.json").read_text()), "hidden_size": 64, "num_attention_heads": 2,
           "intermediate_size": 128, "architectures": ["MPNetModel"]}
    for f in d.glob("model*.safetensors"):
        f.unlink()
    torch.manual_seed(5)
    AutoModel.from_config(MPNetConfig(**cfg)).eval().save_pretrained(d)
    return d


@pytest.mark.parametrize("precision", ["int7-row", "int8-row", "int8"])
def test_mpnet_on_the_int8_attention_adds_the_bias(mpnet_head32, precision, monkeypatch):
    """The int8 attention adds MPNet's relative bias (i8_attend.h's scores, both SIMD builds; it was refused): with
    it, each precision's vectors stay as close to HF fp32 as with fp32 attention, the bias's share of the outputs
    kept (zeroing it moves them 10x more), alone and in a padded batch; the bf16 forms still add none, so bf16
    keeps fp32 attention."""
    from millis.common.hardware import has_bf16
    from millis.encoder.text import TextEncoder
    from millis.kernels.native import runnable_isas

    isas = [i for i in runnable_isas() if i in ("avx512", "avx2")] if native_isa() else []
    if not isas:
        pytest.skip("the int8 attention runs on the avx512 and avx2 builds")
    src = resolve(str(mpnet_head32))
    enc = TextEncoder(src.path, src.input_names, 128)
    texts = sample_texts()[:7] + [" ".join(sample_texts() * 3)]
    want = reference_outputs(src.path, "embed", texts)
    feeds = enc.encode(texts).feeds
    weights = from_hf(src.path, "embed", src.pooling, CPU)
    flat = from_hf(src.path, "embed", src.pooling, CPU)
    flat.rel.zero_()  # what the native kernels read: the bias's buckets, all 0

    def cos_min(a, b):
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())

    for isa in isas:
        monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
        att8 = NativeBert(weights, precision, 2, attention="int8")
        assert att8.attn == 2  # ATTN_INT8
        got = att8(*feeds.values())
        ref = NativeBert(weights, precision, 2)(*feeds.values())  # the same matrices, fp32 attention
        assert cos_min(got, want) >= min(0.999, cos_min(ref, want) - 2e-3), (isa, cos_min(got, want))
        unbiased = NativeBert(flat, precision, 2, attention="int8")(*feeds.values())
        assert 1 - cos_min(unbiased, ref) > 10 * (1 - cos_min(got, ref)), isa  # the guard: the bias counts
        alone = att8(*(f[-1:] for f in feeds.values()))
        np.testing.assert_allclose(alone, got[-1:], atol=2e-2)
    if has_bf16():
        assert NativeBert(weights, "bf16").attn == 0  # ATTN_F32: the bf16 attention adds no bias


def test_a_sequence_longer_than_the_positions_is_refused(tiny_dirs):
    """Positions in range do not make a sequence fit the relative bias's table: 200 tokens with wrapped positions on
    a 128-position MPNet read past it (garbage or NaN, a review's probe); now refused. 128 still runs."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    model = NativeBert(from_hf(resolve("tiny:mpnet").path, "embed", resolve("tiny:mpnet").pooling, CPU), "fp32")
    for n in (128, 200):
        ids, types = np.full(n, 10, np.int32), np.zeros(n, np.int32)
        pos = (np.arange(n) % 128).astype(np.int32)
        if n == 128:
            assert np.isfinite(model.hidden_states(ids, pos, types, np.array([0, n]))).all()
            continue
        with pytest.raises(MillisError, match="longer than its positions"):
            model.hidden_states(ids, pos, types, np.array([0, n]))

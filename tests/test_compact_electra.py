"""ELECTRA on millis's compact encoder: BERT's layers under `electra.`, and its classification head (dense, erf
GELU, out_proj on token 0) read as BERT's pooler + classifier with a GELU. electra-base / -large (embedding_size
= hidden_size) and electra-small (narrower embeddings, LayerNorm'd at their width, then HF's embeddings_project up
to the hidden size: tiny:electra's layout, 16 -> 32) run natively and on the CUDA encoder's torch form."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import compact_cpu_outputs, native_fp32, reference_outputs
from millis.artifact.model import run_texts
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder.bert_weights import gelu_erf
from millis.encoder.source import resolve
from millis.gpu.encoder import RunOptions, from_hf
from millis.encoder.text import TextEncoder
from millis.kernels.native import native_isa, runnable_isas

CPU = RunOptions(dtype="fp32", fuse="torch", device="cpu")


@pytest.fixture(scope="module")
def electra_base_like(tmp_path_factory, tiny_dirs):
    """tiny:electra's tokenizer under an ELECTRA whose embedding_size is its hidden size (electra-base's layout:
    no embeddings_project), random weights large enough that the head's GELU bends."""
    import torch
    from transformers import AutoModelForSequenceClassification, ElectraConfig

    d = tmp_path_factory.mktemp("el") / "electra-base-like"
    shutil.copytree(tiny_dirs["electra"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(embedding_size=cfg["hidden_size"])
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(ElectraConfig(**cfg)).eval()
    assert not hasattr(model.electra, "embeddings_project")
    for f in d.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(d)
    return d


def test_gelu_erf_is_torchs():
    import torch

    x = np.linspace(-9, 9, 20001).astype(np.float32)
    np.testing.assert_allclose(gelu_erf(x), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=2e-6)


@pytest.mark.parametrize("layout", ["base", "small"])
@pytest.mark.parametrize("task", ["classify", "embed"])
def test_electra_on_the_native_kernels_matches_hf(tmp_path, electra_base_like, tiny_dirs, task, layout):
    import torch

    if native_isa() is None:
        pytest.skip("no native kernels here")
    folder = electra_base_like if layout == "base" else tiny_dirs["electra"]
    if layout == "small":  # the guard: a projection to run
        from transformers import AutoModelForSequenceClassification

        hf = AutoModelForSequenceClassification.from_pretrained(str(folder))
        assert tuple(hf.electra.embeddings_project.weight.shape) == (32, 16)
    texts = sample_texts()[:6] + [" ".join(sample_texts() * 3)]
    src, enc, native = native_fp32(folder, task, tmp_path)
    want = reference_outputs(folder, task, texts)
    np.testing.assert_allclose(run_texts(native, enc, texts).outputs, want, atol=1e-4)
    np.testing.assert_allclose(compact_cpu_outputs(folder, task, src.pooling, enc, texts), want, atol=1e-4)
    if task == "classify":  # a pair: token type 1 on the document, as HF's pair encoding gives it
        from millis.artifact.model import run_pairs

        pairs = [("where is my card", "my card is lost"), ("hello", "the weather is nice today")]
        assert enc.segments
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        hf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        tok = AutoTokenizer.from_pretrained(str(folder))
        with torch.no_grad():
            ref = np.concatenate([hf(**tok(q, d, return_tensors="pt")).logits.numpy() for q, d in pairs])
        np.testing.assert_allclose(run_pairs(native, enc, pairs).outputs, ref, atol=1e-4)


def test_electra_embedding_width_and_a_missing_projection(tmp_path, tiny_dirs):
    """A config.json without embedding_size is ElectraConfig's 128, not the hidden size (so tiny:electra's 16-wide
    tables under it are refused by their shape, by name); embedding_size = hidden_size has no projection; a small
    layout's checkpoint without embeddings_project is refused by name."""
    from millis.encoder.bert_weights import EncoderConfig

    cfg = json.loads((tiny_dirs["electra"] / "config.json").read_text())
    assert EncoderConfig.from_hf(cfg).embedding == 16 and EncoderConfig.from_hf(cfg).embedding_width == 16
    assert EncoderConfig.from_hf({**cfg, "embedding_size": 32}).embedding == 0
    d = tmp_path / "no-size"
    shutil.copytree(tiny_dirs["electra"], d)
    cfg.pop("embedding_size")
    assert EncoderConfig.from_hf(cfg).embedding_width == 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MillisError, match=r"embeddings.word_embeddings.weight is \(\d+, 16\), but config.json needs "
                                          r"\(\d+, 128\)"):
        from millis.encoder.native import NativeBert
        from millis.encoder.bert_weights import load_arrays

        NativeBert(load_arrays(d, "classify", resolve("tiny:electra").pooling), "fp32")
    from safetensors.numpy import load_file, save_file

    e = tmp_path / "no-projection"
    shutil.copytree(tiny_dirs["electra"], e)
    state = {k: v for k, v in load_file(str(e / "model.safetensors")).items() if "embeddings_project" not in k}
    save_file(state, str(e / "model.safetensors"))
    with pytest.raises(MillisError, match="embeddings_project.weight"):
        from_hf(e, "classify", resolve("tiny:electra").pooling, CPU)


@pytest.mark.parametrize("isa", runnable_isas() if native_isa() else ["scalar"])
def test_electra_small_in_every_native_precision(tiny_dirs, isa, monkeypatch):
    """electra-small's layout (the projection in fp32 before layer 0's quantized qkv) in every native precision on
    every build this CPU runs, against the CUDA encoder's torch form in fp32, with padding; a row's vector does not
    depend on its batch-mates."""
    import torch

    from millis.encoder.native import PRECISIONS, NativeBert
    from millis.common.hardware import has_bf16

    if native_isa() is None:
        pytest.skip("no native kernels here")
    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    src = resolve("tiny:electra")
    enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
    feeds = enc.encode(sample_texts()[:8]).feeds
    compact = from_hf(src.path, "embed", src.pooling, CPU)
    with torch.inference_mode():
        ref = compact(*(torch.from_numpy(f) for f in feeds.values())).numpy()
    floor = {"fp32": 0.99999, "bf16": 0.999, "int8-row": 0.995, "int7-row": 0.98, "int7-row-a8": 0.98}
    for precision in PRECISIONS:
        if precision == "bf16" and not has_bf16():
            continue
        model = NativeBert(compact, precision, 2)
        out = model(*feeds.values())
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        assert out.shape == ref.shape and cos.min() >= floor.get(precision, 0.995), (precision, cos.min())
        if precision == "fp32":
            np.testing.assert_allclose(out, ref, atol=1e-5)
        alone = model(*(f[3:4, :int(feeds["attention_mask"][3].sum())] for f in feeds.values()))
        np.testing.assert_allclose(alone, out[3:4], atol=1e-5 if precision == "fp32" else 2e-2)

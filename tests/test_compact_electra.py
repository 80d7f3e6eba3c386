"""ELECTRA on millis's compact encoder: BERT's layers under `electra.`, and its classification head (dense, erf
GELU, out_proj on token 0) read as BERT's pooler + classifier with a GELU. electra-base / -large (embedding_size
= hidden_size) run natively; electra-small's embedding projection is refused by name (ONNX Runtime and
OpenVINO run it: tests/test_families.py)."""
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
from millis.kernels.native import native_isa

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


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_electra_on_the_native_kernels_matches_hf(tmp_path, electra_base_like, task):
    import torch

    if native_isa() is None:
        pytest.skip("no native kernels here")
    texts = sample_texts()[:6] + [" ".join(sample_texts() * 3)]
    src, enc, native = native_fp32(electra_base_like, task, tmp_path)
    want = reference_outputs(electra_base_like, task, texts)
    np.testing.assert_allclose(run_texts(native, enc, texts).outputs, want, atol=1e-4)
    np.testing.assert_allclose(compact_cpu_outputs(electra_base_like, task, src.pooling, enc, texts), want, atol=1e-4)
    if task == "classify":  # a pair: token type 1 on the document, as HF's pair encoding gives it
        from millis.artifact.model import run_pairs

        pairs = [("where is my card", "my card is lost"), ("hello", "the weather is nice today")]
        assert enc.segments
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        hf = AutoModelForSequenceClassification.from_pretrained(str(electra_base_like)).eval()
        tok = AutoTokenizer.from_pretrained(str(electra_base_like))
        with torch.no_grad():
            ref = np.concatenate([hf(**tok(q, d, return_tensors="pt")).logits.numpy() for q, d in pairs])
        np.testing.assert_allclose(run_pairs(native, enc, pairs).outputs, ref, atol=1e-4)


def test_electra_small_is_refused_by_name(tiny_dirs):
    with pytest.raises(MillisError, match="embedding_size .16. is not its hidden_size .32"):
        from_hf(tiny_dirs["electra"], "classify", resolve("tiny:electra").pooling, CPU)


def test_electra_without_embedding_size_reads_hfs_default(tiny_dirs):
    """A config.json without embedding_size is ElectraConfig's 128, not the hidden size: refused by name, not by a
    shape check later."""
    from millis.encoder.bert_weights import EncoderConfig

    cfg = json.loads((tiny_dirs["electra"] / "config.json").read_text())
    cfg.pop("embedding_size")
    with pytest.raises(MillisError, match=r"embedding_size \(128\) is not its hidden_size \(32"):
        EncoderConfig.from_hf(cfg)

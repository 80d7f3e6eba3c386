"""ModernBERT on millis's compact encoder (millis.encoder.modernbert): pre-LayerNorm layers, rotary positions at two
bases, sliding-window layers, a GLU feed-forward and its head (dense, GELU, LayerNorm, the classifier on [CLS]), on
the native kernels in every precision they run it in and on the CUDA encoder's torch form, against transformers in
fp32. tiny:modernbert: head size 8, layer 1 slides with a window of 4 each way; `modernbert_h64`: head size 32 (the
int8 attention's), layers 1 and 2 slide with a window of 3, and every LayerNorm and bias random (transformers
initialises them to ones and zeros, under which a LayerNorm or a bias in the wrong place goes unseen)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import (compact_cpu_outputs, native_fp32, native_precision_checks, optimized_native_answers_as_hf,
                      reference_outputs, saved_variant, torch_form_on_feeds)
from millis.artifact.model import run_texts
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder.bert_weights import EncoderConfig
from millis.encoder.source import Pooling, resolve
from millis.gpu.encoder import RunOptions, from_hf
from millis.kernels.native import native_isa, runnable_isas

CPU = RunOptions(dtype="fp32", fuse="torch", device="cpu")
# long enough for every window: the joined text is cut at 128 tokens
TEXTS = sample_texts()[:6] + [" ".join(sample_texts() * 3)]


def save_variant(base, d, seed: int, randomise: bool = False, **changes):
    """`base`'s tokenizer and pooling under a ModernBERT of `changes` (config.json's keys), random weights;
    randomise: every LayerNorm's weight and bias and every linear bias drawn too, but the q / k biases, zero (the
    native kernels rotate q and k before the attention adds biases: they refuse nonzero ones)."""
    from transformers import ModernBertConfig

    def draw(name, p, cfg):
        if "norm" in name:
            p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.3)
            if "Wqkv" in name:
                p[:2 * cfg["hidden_size"]] = 0
    if randomise:
        changes = dict(changes, norm_bias=True, mlp_bias=True, attention_bias=True, classifier_bias=True)
    return saved_variant(base, d, ModernBertConfig, seed, changes, draw if randomise else None)


@pytest.fixture(scope="module")
def modernbert_h64(tmp_path_factory, tiny_dirs):
    d = tmp_path_factory.mktemp("mb") / "modernbert-h64"
    return save_variant(tiny_dirs["modernbert"], d, 5, True, hidden_size=64, num_attention_heads=2,
                        intermediate_size=96, num_hidden_layers=3, local_attention=6,
                        layer_types=["full_attention", "sliding_attention", "sliding_attention"])[0]


def test_config_fields_in_both_spellings(tiny_dirs):
    """transformers 5's layer_types / rope_parameters and transformers 4's global_attn_every_n_layers /
    global_rope_theta / local_rope_theta give the same fields; what the kernels do not run is refused by name."""
    cfg = json.loads((tiny_dirs["modernbert"] / "config.json").read_text())
    c = EncoderConfig.from_hf(cfg)
    assert (c.prenorm, c.rope_theta, c.rope_local_theta, c.window, c.local_layers) == (True, 160000, 10000, 4, (1,))
    assert (c.ffn_in, c.type_vocab, c.eps, c.head_act) == (2 * c.intermediate, 1, 1e-5, "gelu")
    old = {k: v for k, v in cfg.items() if k not in ("layer_types", "rope_parameters")}
    old.update(num_hidden_layers=7, global_attn_every_n_layers=3, global_rope_theta=80000.0, local_rope_theta=5000.0)
    c = EncoderConfig.from_hf(old)
    assert (c.rope_theta, c.rope_local_theta, c.local_layers) == (80000, 5000, (1, 2, 4, 5))
    old.pop("local_rope_theta")  # transformers 4's default, 10,000, not the global base; null: the global base
    assert EncoderConfig.from_hf(old).rope_local_theta == 10000
    assert EncoderConfig.from_hf({**old, "local_rope_theta": None}).rope_local_theta == 80000
    with pytest.raises(MillisError, match="local_attention 1"):
        EncoderConfig.from_hf({**cfg, "local_attention": 1})
    with pytest.raises(MillisError, match="hidden_activation 'silu'"):
        EncoderConfig.from_hf({**cfg, "hidden_activation": "silu"})
    with pytest.raises(MillisError, match="rope_type 'linear'"):
        EncoderConfig.from_hf({**cfg, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}})


@pytest.fixture(scope="module")
def modernbert_mean(tmp_path_factory, tiny_dirs):
    """A classifier on the mean of its rows (classifier_pooling "mean", as AnswerDotAI's checkpoints have it)."""
    d = tmp_path_factory.mktemp("mb") / "modernbert-mean"
    return save_variant(tiny_dirs["modernbert"], d, 9, True, classifier_pooling="mean")[0]


@pytest.mark.parametrize("model", ["tiny", "h64", "mean"])
@pytest.mark.parametrize("task", ["classify", "embed"])
def test_modernbert_on_the_native_kernels_matches_hf(tmp_path, tiny_dirs, modernbert_h64, modernbert_mean, task,
                                                     model):
    if native_isa() is None:
        pytest.skip("no native kernels here")
    folder = {"tiny": tiny_dirs["modernbert"], "h64": modernbert_h64, "mean": modernbert_mean}[model]
    src, enc, native = native_fp32(folder, task, tmp_path)
    want = reference_outputs(folder, task, TEXTS)
    assert max(len(enc.encode([t]).feeds["input_ids"][0]) for t in TEXTS) > 2 * 4 + 1  # past every window
    np.testing.assert_allclose(run_texts(native, enc, TEXTS).outputs, want, atol=1e-4)
    np.testing.assert_allclose(compact_cpu_outputs(folder, task, src.pooling, enc, TEXTS), want, atol=1e-4)


@pytest.mark.parametrize("isa", runnable_isas() if native_isa() else ["scalar"])
def test_modernbert_in_every_native_precision(modernbert_h64, isa, monkeypatch):
    """Every precision the kernels run ModernBERT in (and the int8 attention, with the window as its bias) on every
    build this CPU runs, against the torch form in fp32, with padding; a row does not depend on its batch-mates;
    the token split and the row split give the same values."""
    from millis.encoder.native import PRECISIONS, NativeBert
    from millis.common.hardware import has_bf16

    if native_isa() is None:
        pytest.skip("no native kernels here")
    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    feeds, compact, ref = torch_form_on_feeds(modernbert_h64, sample_texts()[:7] + TEXTS[-1:])
    lengths = feeds["attention_mask"].sum(1)
    assert lengths.max() > 2 * 3 + 1 and lengths.min() < lengths.max()  # past the window, and padding
    floor = {"fp32": 0.99999, "bf16": 0.999, "int7-row": 0.98, "int7-row-a8": 0.98}
    runs = [(p, "auto") for p in PRECISIONS if p != "int8-row" and (p != "bf16" or has_bf16())]
    runs += [("int7-row", "int8"), ("int8", "int8")] if isa != "scalar" else []
    for precision, attention in runs:
        model = NativeBert(compact, precision, 2, attention=attention)
        native_precision_checks(model, feeds, ref, floor.get(precision, 0.995), (precision, attention))
    with pytest.raises(MillisError, match="int8-row does not run ModernBERT"):
        NativeBert(compact, "int8-row", 2)


def test_what_the_compact_encoder_refuses(tmp_path, tiny_dirs):
    """q / k biases (the kernels rotate before the attention adds them) natively; a mask with a hole in a row (the
    window is measured on the kept tokens, HF's on columns); a Wqkv that is not three stacked matrices."""
    import torch
    from safetensors.numpy import load_file, save_file

    from millis.encoder.native import NativeBert

    d, model = save_variant(tiny_dirs["modernbert"], tmp_path / "bias", 9, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.Wqkv.bias.normal_()
    model.save_pretrained(d)
    compact = from_hf(d, "embed", resolve(str(d)).pooling, CPU)
    if native_isa() is not None:
        with pytest.raises(MillisError, match="attention_bias"):
            NativeBert(compact, "fp32")
        native = NativeBert(from_hf(tiny_dirs["modernbert"], "embed", Pooling(), CPU), "fp32")
        ids = np.full((2, 6), 7)
        assert native(ids, np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])).shape == (2, 32)  # one run each
        with pytest.raises(MillisError, match="one run"):
            native(ids, np.array([[1, 1, 0, 1, 1, 0], [1] * 6]))
    e = tmp_path / "rows"
    shutil.copytree(tiny_dirs["modernbert"], e)
    state = load_file(str(e / "model.safetensors"))
    key = next(k for k in state if k.endswith("layers.0.attn.Wqkv.weight"))
    save_file({**state, key: np.concatenate([state[key], state[key][:1]])}, str(e / "model.safetensors"))
    with pytest.raises(MillisError, match="Wqkv.weight has 97 rows"):
        from_hf(e, "embed", Pooling(), CPU)


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_optimize_builds_and_serves_native_modernbert(tmp_path, tiny_dirs, quick_measure, task):
    """`millis optimize` on a ModernBERT: the native variants build (weights and the smoothing calibration stored), the
    artifact loads without torch's model and answers as transformers does."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    optimized_native_answers_as_hf("modernbert", task, tmp_path, tiny_dirs, quick_measure, TEXTS[:4] + TEXTS[-1:])

"""DeBERTa-v2 / v3 on millis's compact encoder (millis.encoder.deberta): BERT's layers with a disentangled attention
(content-to-position and position-to-content terms over log-bucketed relative positions, tables made from each
layer's own query and key projections), no absolute positions (v3), ContextPooler's GELU head; on the native kernels
in every precision and both attentions they run it in, and on the CUDA encoder's torch form, against transformers in
fp32. tiny:deberta-v2: head size 8, 16 position buckets (log buckets from 8 tokens apart); `deberta_h32`: head size 32
(the int8 attention's), every LayerNorm and bias random (transformers initialises them to ones and zeros, under which
one in the wrong place goes unseen); `deberta_v2`: c2p alone, no buckets (relative positions clamped at 24),
absolute positions and two token types (the v2 layout)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (compact_cpu_outputs, native_fp32, native_precision_checks, optimized_native_answers_as_hf,
                      reference_outputs, saved_variant, torch_form_on_feeds)
from millis.artifact.model import run_texts
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder import deberta
from millis.encoder.bert_weights import EncoderConfig
from millis.encoder.source import Pooling
from millis.gpu.encoder import RunOptions, from_hf
from millis.kernels.native import native_isa, runnable_isas

CPU = RunOptions(dtype="fp32", fuse="torch", device="cpu")
TEXTS = sample_texts()[:6] + [" ".join(sample_texts() * 3)]  # the joined text is cut at 128 tokens


def save_variant(base, d, seed: int, **changes):
    """`base`'s tokenizer under a DeBERTa-v2 of `changes` (config.json's keys), random weights, every LayerNorm and
    bias random too."""
    from transformers import DebertaV2Config

    def draw(name, p, cfg):
        if "LayerNorm" in name:
            p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.3)
        elif "rel_embeddings" in name:
            p.normal_(0.0, 1.0)  # (init's 0.02: the position terms would hardly count)
    return saved_variant(base, d, DebertaV2Config, seed, changes, draw)[0]


@pytest.fixture(scope="module")
def deberta_h32(tmp_path_factory, tiny_dirs):
    d = tmp_path_factory.mktemp("deb") / "deberta-h32"
    return save_variant(tiny_dirs["deberta-v2"], d, 5, hidden_size=64, num_attention_heads=2, intermediate_size=96,
                        num_hidden_layers=3, pooler_hidden_size=64)


@pytest.fixture(scope="module")
def deberta_v2(tmp_path_factory, tiny_dirs):
    d = tmp_path_factory.mktemp("deb") / "deberta-v2-layout"
    return save_variant(tiny_dirs["deberta-v2"], d, 7, pos_att_type=["c2p"], position_buckets=-1,
                        max_relative_positions=24, position_biased_input=True, type_vocab_size=2,
                        norm_rel_ebd="none")


def test_config_fields_and_what_is_refused(tiny_dirs):
    cfg = json.loads((tiny_dirs["deberta-v2"] / "config.json").read_text())
    c = EncoderConfig.from_hf(cfg)
    assert (c.disentangled, c.dis_terms, c.dis_buckets, c.dis_max_rel, c.rel_norm) == (True, ("c2p", "p2c"), 16, 128,
                                                                                       True)
    assert (c.absolute, c.type_vocab, c.head_act, deberta.span(c)) == (False, 1, "gelu", 16)
    assert abs(deberta.scale(c) - 1 / np.sqrt(8 * 3)) < 1e-7
    # the original v3 configs' "p2c|c2p" string, split as HF splits it; a list is taken as it is (HF matches "c2p"
    # exactly: "C2P" in a list is no term there, and refused here rather than read as c2p)
    assert EncoderConfig.from_hf({**cfg, "pos_att_type": "P2C | c2p"}).dis_terms == ("c2p", "p2c")
    assert EncoderConfig.from_hf({**cfg, "pos_att_type": ["p2c"]}).dis_terms == ("p2c",)
    # no type_vocab_size in config.json: HF's DeBERTa default 0, no token type input (a pair's type 1 was refused)
    no_types = {k: v for k, v in cfg.items() if k != "type_vocab_size"}
    assert EncoderConfig.from_hf(no_types).type_vocab == 1
    from millis.encoder.source import type_vocab_size
    assert type_vocab_size("deberta-v2", no_types) == 0 and type_vocab_size("bert", no_types) == 2
    for change, match in ((dict(share_att_key=False), "share_att_key false"),
                          (dict(conv_kernel_size=3), "conv_kernel_size 3"),
                          (dict(pos_att_type=["c2p", "p2p"]), "pos_att_type \\['p2p'\\]"),
                          (dict(pos_att_type=["C2P", "p2c"]), "pos_att_type \\['C2P'\\]"),
                          (dict(relative_attention=False), "relative_attention false"),
                          (dict(embedding_size=16), "embedding_size 16"),
                          (dict(pooler_hidden_act="tanh"), "pooler_hidden_act 'tanh'"),
                          (dict(pooler_hidden_size=16), "pooler_hidden_size 16"),
                          (dict(norm_rel_ebd="layer_norm|other"), "norm_rel_ebd")):
        with pytest.raises(MillisError, match=f"does not run DeBERTa with .*{match}"):
            EncoderConfig.from_hf({**cfg, **change})


@pytest.mark.parametrize("buckets,most", [(256, 512), (16, 128), (-1, 24)])
def test_relative_positions_are_hfs(buckets, most):
    """deberta.buckets (numpy, float32 steps) against transformers' build_relative_position at every distance; the
    table rows clamp S + bucket to [0, 2S)."""
    import torch
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    c = EncoderConfig(hidden=32, layers=1, heads=4, intermediate=64, vocab=10, max_positions=most, type_vocab=1,
                      family=deberta.FAMILY, dis_terms=("c2p",), dis_buckets=max(0, buckets), dis_max_rel=most)
    x = torch.zeros(1, most, 8)
    want = build_relative_position(x, x, bucket_size=buckets, max_position=most)[0].numpy()  # (q, k): q - k's
    d = np.arange(most)[:, None] - np.arange(most)[None, :]
    assert np.array_equal(deberta.buckets(d, c), want)
    S = deberta.span(c)
    rows = deberta.table_rows(c, most)
    assert np.array_equal(rows[most - 1 + d], np.clip(want + S, 0, 2 * S - 1))


@pytest.mark.parametrize("model", ["tiny", "h32", "v2"])
@pytest.mark.parametrize("task", ["classify", "embed"])
def test_deberta_on_the_native_kernels_matches_hf(tmp_path, tiny_dirs, deberta_h32, deberta_v2, task, model):
    if native_isa() is None:
        pytest.skip("no native kernels here")
    folder = {"tiny": tiny_dirs["deberta-v2"], "h32": deberta_h32, "v2": deberta_v2}[model]
    src, enc, native = native_fp32(folder, task, tmp_path)
    want = reference_outputs(folder, task, TEXTS)
    assert max(len(enc.encode([t]).feeds["input_ids"][0]) for t in TEXTS) > 100  # past the exact buckets (8, 24)
    np.testing.assert_allclose(run_texts(native, enc, TEXTS).outputs, want, atol=1e-4)
    np.testing.assert_allclose(compact_cpu_outputs(folder, task, src.pooling, enc, TEXTS), want, atol=1e-4)


@pytest.mark.parametrize("isa", runnable_isas() if native_isa() else ["scalar"])
def test_deberta_in_every_native_precision(deberta_h32, isa, monkeypatch):
    """Every native precision (and the int8 attention, the dense position bias added to its scores) on every build
    this CPU runs, against the torch form in fp32, with padding; a row does not depend on its batch-mates; the token
    split and the row split give the same values; the bf16 attention, which adds no bias, is never chosen."""
    from millis.common.hardware import has_bf16
    from millis.encoder.native import ATTN_F32, PRECISIONS, NativeBert

    if native_isa() is None:
        pytest.skip("no native kernels here")
    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    feeds, compact, ref = torch_form_on_feeds(deberta_h32, sample_texts()[:7] + TEXTS[-1:])
    lengths = feeds["attention_mask"].sum(1)
    assert lengths.max() > 100 and lengths.min() < lengths.max()  # past the exact buckets, and padding
    floor = {"fp32": 0.99999, "bf16": 0.999, "int7-row": 0.98, "int7-row-a8": 0.98}
    runs = [(p, "auto") for p in PRECISIONS if p != "bf16" or has_bf16()]
    runs += [("int7-row", "int8"), ("int8", "int8")] if isa != "scalar" else []
    for precision, attention in runs:
        model = NativeBert(compact, precision, 2, attention=attention)
        assert attention == "int8" or model.attn == ATTN_F32, precision
        native_precision_checks(model, feeds, ref, floor.get(precision, 0.995), (precision, attention))


def test_masks_with_holes_and_long_inputs_are_refused(tiny_dirs):
    """Distances are measured on the kept tokens (HF's on columns): a mask's ones must be one run; a sequence over
    max_position_embeddings is refused (the bucket table spans those distances)."""
    from millis.encoder.native import NativeBert

    if native_isa() is None:
        pytest.skip("no native kernels here")
    native = NativeBert(from_hf(tiny_dirs["deberta-v2"], "embed", Pooling(), CPU), "fp32")
    ids = np.full((2, 6), 7)
    assert native(ids, np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])).shape == (2, 32)  # one run each
    with pytest.raises(MillisError, match="one run"):
        native(ids, np.array([[1, 1, 0, 1, 1, 0], [1] * 6]))
    with pytest.raises(MillisError, match="exceeds the model's 128 positions"):
        native(np.full((1, 129), 7), np.ones((1, 129), np.int64))


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_optimize_builds_and_serves_native_deberta(tmp_path, tiny_dirs, quick_measure, task):
    """`millis optimize` on a DeBERTa: the native variants build (with the row precisions' calibration), the artifact
    loads and answers as transformers does."""
    if native_isa() is None:
        pytest.skip("no native kernels here")
    optimized_native_answers_as_hf("deberta-v2", task, tmp_path, tiny_dirs, quick_measure, TEXTS[:4] + TEXTS[-1:])

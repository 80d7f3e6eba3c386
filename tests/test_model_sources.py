"""What a user's own model folder gets from `resolve`: a clear early refusal for what millis cannot run exactly (no
tokenizer, a shard index that does not fit its folder, causal attention on the compact encoder), sharded checkpoints
read, the pair token types HF's pair encoding gives, and default shapes fitted to a short model."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import pytest

from millis.common.config import Shape
from millis.common.errors import MillisError
from millis.encoder.source import TOKENIZER_FILES, inspect_dir, resolve, takes_segments
from millis.optimize.config import PRESETS, OptimizeConfig, fit_shapes


def edited(src, dst, config=None, tokenizer_config=None, drop=()):
    """A copy of a model folder with config.json / tokenizer_config.json keys changed and files left out."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    for name, change in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if change:
            f = dst / name
            f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    return dst


def test_a_folder_without_tokenizer_files_is_refused_early(tiny_dirs, tmp_path):
    # transformers built a 5-token BERT tokenizer from such a folder: every word [UNK], every text alike, and every
    # variant "faithful" to a reference that tokenized the same way
    d = edited(tiny_dirs["bert"], tmp_path / "m", drop=TOKENIZER_FILES)
    with pytest.raises(MillisError, match="has no tokenizer"):
        resolve(str(d))
    assert resolve(str(tiny_dirs["bert"])).segments


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_a_sharded_checkpoint_runs_as_its_one_file(tiny_dirs, tmp_path, quick_measure, safe):
    """save_pretrained past max_shard_size writes shards and an index (model.safetensors.index.json, or
    pytorch_model.bin's): refused until 2026-12-07, now read on every path (transformers' for torch / ONNX Runtime
    / OpenVINO, millis's for the compact encoder: load_state) with the one file's outputs; the source's hash covers
    every shard."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification

    import millis
    from conftest import reference_outputs
    from millis.common.samples import sample_texts
    from millis.encoder.source import weight_files
    from millis.optimize.pipeline import optimize

    d = edited(tiny_dirs["bert"], tmp_path / "m", drop=("model.safetensors",))
    if safe:
        AutoModelForSequenceClassification.from_pretrained(str(tiny_dirs["bert"])).save_pretrained(
            d, max_shard_size="40KB")
    else:  # (transformers 5 writes safetensors only: older ones' .bin shards, as they laid them out)
        import torch
        from safetensors.torch import load_file

        state = load_file(str(tiny_dirs["bert"] / "model.safetensors"))
        names, where = sorted(state), {}
        for k in range(3):
            shard = f"pytorch_model-{k + 1:05d}-of-00003.bin"
            part = {n: state[n] for n in names[k::3]}
            torch.save(part, d / shard)
            where.update(dict.fromkeys(part, shard))
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    shards = weight_files(d)
    assert len(shards) >= 3 and all(f.name.startswith("model-" if safe else "pytorch_model-") for f in shards), shards
    src = resolve(str(d))
    assert src.sha256 != resolve(str(tiny_dirs["bert"])).sha256
    texts = sample_texts()[:8]
    want = reference_outputs(tiny_dirs["bert"], "embed", texts)
    out = optimize(OptimizeConfig(source=str(d), task="embed", out=str(tmp_path / "a"), target=Shape(1, 16),
                                  variants=("ort-fp32-fused", "native-fp32"), measure=quick_measure))
    report = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    for name in ("ort-fp32-fused", "native-fp32"):  # each against the torch reference read from the same shards
        assert report[name]["latency"] and report[name]["fidelity"]["max_abs_diff"] < 1e-5, report[name]
    np.testing.assert_allclose(millis.load(out).embed(texts), want, atol=1e-5)
    if safe:  # a stale single .bin beside safetensors shards (an old folder re-saved): the shards run, and are hashed
        torch_save_beside(d)
        assert weight_files(d) == shards and resolve(str(d)).sha256 == src.sha256
    shards[-1].write_bytes(shards[-1].read_bytes()[:-8] + b"\0" * 8)  # a shard's bytes changed: another source
    assert resolve(str(d)).sha256 != src.sha256


def torch_save_beside(d):
    import torch

    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")


def test_a_shard_index_that_does_not_fit_its_folder_is_named(tiny_dirs, tmp_path):
    d = edited(tiny_dirs["bert"], tmp_path / "m", drop=("model.safetensors",))
    index = d / "model.safetensors.index.json"
    for body, error in (({"weight_map": {}}, "names no shard files"),
                        ({"weight_map": {"a": "../model.safetensors"}}, "names no shard files"),
                        ({"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}},
                         "names 2 shards; missing: model-00001.safetensors, model-00002.safetensors"),
                        ([], "not a shard index"), ({"metadata": {}}, "not a shard index")):
        index.write_text(json.dumps(body))
        with pytest.raises(MillisError, match=re.escape(error)):
            inspect_dir(d)
    index.write_text("{not json")
    with pytest.raises(MillisError, match="not a shard index"):
        inspect_dir(d)
    index.unlink()
    with pytest.raises(MillisError, match="has no weights"):
        inspect_dir(d)


@pytest.mark.parametrize("config, tokenizer_config, segments", [
    ({}, None, True),  # BERT: the document is segment B
    ({"type_vocab_size": 1}, None, False),  # one token type: id 1 is out of its table (every rerank a 500)
    ({}, {"model_input_names": ["input_ids", "attention_mask"]}, False),  # HF feeds type 0: CrossEncoder's scores
    ({}, {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}, True),
    ({}, {"tokenizer_class": "DistilBertTokenizer"}, False),  # its class's names leave token types out (fed type 1)
])
def test_pair_token_types_follow_the_model_and_its_tokenizer(tiny_dirs, tmp_path, config, tokenizer_config,
                                                             segments):
    d = edited(tiny_dirs["bert"], tmp_path / "m", config, tokenizer_config)
    src = inspect_dir(d)
    assert src.segments is segments
    from millis.artifact.meta import SourceMeta

    meta = SourceMeta.of(src)
    assert takes_segments(meta.model_type, meta.segments) is segments  # what load gives the artifact's encoder
    assert inspect_dir(tiny_dirs["roberta"]).segments is False
    assert takes_segments("bert", None) and not takes_segments("roberta", None)  # artifacts from before the field


def test_pair_ids_without_token_types_match_hf(tiny_dirs, tmp_path):
    """A reranker whose tokenizer gives no token_type_ids: the document's tokens are type 0, as HF and
    sentence-transformers feed them (type 1 moved its logits by up to 2.4)."""
    from transformers import AutoTokenizer

    from millis.encoder.text import TextEncoder

    d = edited(tiny_dirs["bert"], tmp_path / "m", None, {"model_input_names": ["input_ids", "attention_mask"]})
    src = inspect_dir(d)
    enc = TextEncoder(src.path, src.input_names, 64, segments=src.segments)
    hf = AutoTokenizer.from_pretrained(str(d))
    want = hf("where is my card", "card delivery")
    assert "token_type_ids" not in want
    ids, _ = enc.pair_ids("where is my card", ["card delivery"])
    feeds = enc.pack(ids, len(ids[0]))
    assert list(ids[0]) == want["input_ids"] and ids[0].second is not None
    assert not feeds["token_type_ids"].any()
    bert = TextEncoder(tiny_dirs["bert"], src.input_names, 64, segments=inspect_dir(tiny_dirs["bert"]).segments)
    rows, _ = bert.pair_ids("where is my card", ["card delivery"])
    assert bert.pack(rows, len(rows[0]))["token_type_ids"].any()  # the guard: BERT's own tokenizer gives segment B


def test_a_causal_bert_is_refused_by_the_compact_encoder():
    from millis.encoder.bert_weights import EncoderConfig

    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 100}
    assert EncoderConfig.from_hf(cfg).hidden == 32
    with pytest.raises(MillisError, match="is_decoder: true .causal attention. is not supported"):
        EncoderConfig.from_hf({**cfg, "is_decoder": True})


def test_default_shapes_fit_a_short_model_and_given_ones_are_named():
    notes = []
    cfg = OptimizeConfig(source="x", preset="quick", measure=PRESETS["quick"])
    got = fit_shapes(cfg, 24, notes.append)
    assert got.target == Shape(1, 24) and got.measure.shapes == (Shape(1, 16), Shape(2, 24))
    assert notes == ["note: the default shape b2xs32 is longer than the model's max length 24: measuring b2xs24 "
                     "instead", "note: the default shape b1xs128 is longer than the model's max length 24: measuring "
                     "b1xs24 instead"]
    assert fit_shapes(cfg, 512, notes.append) == cfg
    with pytest.raises(MillisError, match=r"--target b1xs64 is longer than --max-length 32"):
        fit_shapes(replace(cfg, target=Shape(1, 64), max_length=32), 32, notes.append)
    with pytest.raises(MillisError, match=r"--shapes b4xs40 is longer than the model's max length 24"):
        fit_shapes(replace(cfg, measure=replace(cfg.measure, shapes=(Shape(4, 40),))), 24, notes.append)
    one = fit_shapes(replace(cfg, measure=replace(PRESETS["quick"], shapes=(Shape(1, 16), Shape(1, 128)))), 600,
                     notes.append)
    assert one.measure.shapes == (Shape(1, 16), Shape(1, 128))

"""A sentence-transformers folder's pooling, in both of its config formats, or a clear error where millis would
compute another vector than sentence-transformers (the new `pooling_mode` string was read as mean: a CLS folder
came out at cosine 0.7 to sentence-transformers' own vectors; a Dense layer after the pooling was dropped)."""
from __future__ import annotations

import json

import pytest

from millis.common.errors import MillisError
from millis.encoder.source import Pooling, read_pooling, resolve

POOL = {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}
NORM = {"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"}
TRANSFORMER = {"type": "sentence_transformers.models.Transformer", "path": ""}


def folder(tmp_path, pooling: dict, modules=(TRANSFORMER, POOL), sbert: dict | None = None):
    (tmp_path / "1_Pooling").mkdir(exist_ok=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (tmp_path / "modules.json").write_text(json.dumps(list(modules)))
    if sbert is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps(sbert))
    return tmp_path


@pytest.mark.parametrize("pooling, mode", [
    ({"pooling_mode": "cls", "include_prompt": True}, "cls"),       # sentence-transformers 5+
    ({"pooling_mode": "max"}, "max"),
    ({"pooling_mode": "mean"}, "mean"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),  # the booleans
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}, "mean"),
    ({"pooling_mode": ["cls"]}, "cls"),           # sentence-transformers 6: a list of modes (read as mean before)
    ({"pooling_mode": ["mean_tokens"]}, "mean"),
])
def test_both_formats_give_the_declared_mode(tmp_path, pooling, mode):
    assert read_pooling(folder(tmp_path, pooling)) == Pooling(mode=mode)
    assert read_pooling(folder(tmp_path, pooling, (TRANSFORMER, POOL, NORM))) == Pooling(mode=mode, normalize=True)


@pytest.mark.parametrize("pooling, modules, sbert, why", [
    ({"pooling_mode": "weightedmean"}, (TRANSFORMER, POOL), None, "'weightedmean'.*not supported"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, (TRANSFORMER, POOL), None, "'mean_sqrt_len'.*not supported"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, (TRANSFORMER, POOL), None, "mean \\+ max"),
    ({"pooling_mode": ["cls", "mean"]}, (TRANSFORMER, POOL), None, "cls \\+ mean"),  # one vector of both: refused
    ({"pooling_mode": []}, (TRANSFORMER, POOL), None, "neither a pooling mode nor a list"),
    ({"pooling_mode": 3}, (TRANSFORMER, POOL), None, "neither a pooling mode nor a list"),
    ({"pooling_mode": "mean", "include_prompt": False}, (TRANSFORMER, POOL), None, "include_prompt"),
    ({"pooling_mode": "mean"}, (TRANSFORMER, POOL, {"type": "sentence_transformers.models.Dense", "path": "2_Dense"},
                               NORM), None, "Dense"),
    ({"pooling_mode": "mean"}, (TRANSFORMER, POOL), {"do_lower_case": True}, "do_lower_case"),
])
def test_what_millis_would_compute_otherwise_is_refused(tmp_path, pooling, modules, sbert, why):
    with pytest.raises(MillisError, match=why):
        read_pooling(folder(tmp_path, pooling, modules, sbert))


def test_the_embedded_minilm_reads_as_before():
    src = resolve("builtin:minilm")
    assert read_pooling(src.path) == Pooling(mode="mean", normalize=True)


def test_a_default_prompt_is_refused(tmp_path):
    d = folder(tmp_path, {"pooling_mode": "mean"})
    (d / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "},
                                                                     "default_prompt_name": "query"}))
    with pytest.raises(MillisError, match="default_prompt_name 'query'"):  # vectors 0.14 off, silently
        read_pooling(d)
    (d / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "},
                                                                     "default_prompt_name": None}))
    assert read_pooling(d) == Pooling(mode="mean")


def test_the_length_texts_are_cut_to_is_sentence_transformers_own(tmp_path, tiny_dirs):
    """No max_seq_length in sentence_bert_config.json (sentence-transformers 6 writes none): the tokenizer's
    model_max_length, as sentence-transformers and HF's tokenizers cut; it was the position limit."""
    import shutil

    from millis.encoder.source import model_max_length

    src = resolve("tiny:bert")
    d = tmp_path / "m"
    shutil.copytree(src.path, d)
    tok = json.loads((d / "tokenizer_config.json").read_text())
    for limit, want in ((64, 64), (10 ** 30, resolve(str(d)).max_length), (None, resolve(str(d)).max_length)):
        (d / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": limit}))
        assert model_max_length(resolve(str(d))) == want, limit
    (d / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 64}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    assert model_max_length(resolve(str(d))) == 32  # the folder's own first
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": None}))  # a TypeError before
    assert model_max_length(resolve(str(d))) == 64
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": "long"}))
    with pytest.raises(MillisError, match="'long' is not a positive integer"):
        model_max_length(resolve(str(d)))

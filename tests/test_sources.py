import json

import pytest

from millis.common.errors import MillisError
from millis.encoder.source import resolve


def test_missing_directory(tmp_path):
    with pytest.raises(MillisError, match="model directory not found"):
        resolve(str(tmp_path / "nope"))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(MillisError, match="no config.json"):
        resolve(str(tmp_path))


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MillisError, match=r"unsupported architecture 'gpt2'.*BERT.*DistilBERT.*RoBERTa"):
        resolve(str(tmp_path))


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MillisError, match="no weights"):
        resolve(str(tmp_path))


def test_unknown_builtin_and_tiny():
    with pytest.raises(MillisError, match="available: builtin:minilm"):
        resolve("builtin:gpt5")
    with pytest.raises(MillisError, match="tiny:bert"):
        resolve("tiny:t5")


def test_builtin_minilm_is_the_real_sentence_transformer():
    src = resolve("builtin:minilm")
    assert (src.model_type, src.num_layers, src.hidden_size, src.num_heads) == ("bert", 6, 384, 12)
    assert src.pooling.mode == "mean" and src.pooling.normalize
    assert not src.has_classifier
    assert len(src.sha256) == 64


@pytest.mark.parametrize("family,inputs", [("bert", 3), ("distilbert", 2), ("roberta", 3), ("xlm-roberta", 3)])
def test_tiny_families(tiny_dirs, family, inputs):
    src = resolve(f"tiny:{family}")
    assert src.model_type == family and src.has_classifier and len(src.input_names) == inputs
    assert src.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.path))
    ids = tok("I lost my card yesterday and need a new one.")["input_ids"]
    assert tok.unk_token_id not in ids  # every word of the sample texts is in the tiny vocab


def test_classify_needs_a_head():
    from millis.encoder.tasks import load_task_model

    with pytest.raises(MillisError, match="no sequence-classification head"):
        load_task_model(resolve("builtin:minilm"), "classify")

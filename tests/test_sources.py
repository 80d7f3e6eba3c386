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


@pytest.mark.parametrize("family,inputs,positions", [
    ("bert", 3, 130), ("distilbert", 2, 128), ("roberta", 3, 129), ("xlm-roberta", 3, 129), ("mpnet", 2, 128),
    ("electra", 3, 128), ("deberta-v2", 2, 128), ("modernbert", 2, 128)])
def test_tiny_families(tiny_dirs, family, inputs, positions):
    """Token type ids only where the model embeds them (MPNet, ModernBERT and DeBERTa-v3's type_vocab_size 0 have
    none); RoBERTa's, XLM-R's and MPNet's positions start after the padding index (pad_token_id + 1; MPNet's is 1
    whatever pad_token_id says: tiny:mpnet's 0 made it 129, and a 129th token read past HF's position table)."""
    src = resolve(f"tiny:{family}")
    assert src.model_type == family and src.has_classifier and len(src.input_names) == inputs
    assert src.max_length == positions
    assert src.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.path))
    ids = tok("I lost my card yesterday and need a new one.")["input_ids"]
    assert tok.unk_token_id not in ids  # every word of the sample texts is in the tiny vocab


def test_classify_needs_a_head():
    from millis.encoder.tasks import load_task_model

    with pytest.raises(MillisError, match="no sequence-classification head"):
        load_task_model(resolve("builtin:minilm"), "classify")


def _bert_dir(path, cfg_extra: dict | None = None, rename: dict | None = None, vocab_lines: int = 100) -> str:
    """A tiny BERT folder: weights saved under their names (`rename`: some under others'), a vocab.txt."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    sd = model.state_dict()
    for old, new in (rename or {}).items():
        sd[new] = sd.pop(old)
    model.save_pretrained(str(path), state_dict=sd)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **(cfg_extra or {})}))
    (path / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(vocab_lines)) + "\n")
    return str(path)


def test_other_architectures_under_a_bert_config_are_refused(tmp_path):
    """jina-embeddings-v2 / v3 say model_type bert / xlm-roberta with their own code (auto_map), ALiBi or rotary
    positions and other weight names: transformers loaded them with random weights in the missing places (two
    loads of one folder gave vectors at cosine 0.56), silently. A tokenizer past the embedding table, too."""
    from millis.encoder.hf import load_hf
    from transformers import AutoModel

    cases = [({"auto_map": {"AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"}},
              "own modelling code"),
             ({"position_embedding_type": "alibi"}, "position_embedding_type 'alibi'")]
    for i, (extra, said) in enumerate(cases):
        with pytest.raises(MillisError, match=said):
            resolve(_bert_dir(tmp_path / f"c{i}", extra))
    gated = _bert_dir(tmp_path / "gated", rename={"encoder.layer.0.output.dense.weight": "encoder.layer.0.mlp.wo.weight"})
    resolve(gated)  # its config reads as a BERT's
    with pytest.raises(MillisError, match=r"do not fit BertModel.*missing: encoder.layer.0.output.dense.weight.*"
                                          r"unexpected: encoder.layer.0.mlp.wo.weight"):
        load_hf(gated, AutoModel)
    assert load_hf(_bert_dir(tmp_path / "fine"), AutoModel) is not None
    with pytest.raises(MillisError, match="ids up to 149, past the embedding table's 100 rows"):
        resolve(_bert_dir(tmp_path / "big_vocab", vocab_lines=150))


def test_labels_without_names_are_transformers_label_i(tmp_path):
    d = _bert_dir(tmp_path / "cls", {"architectures": ["BertForSequenceClassification"], "num_labels": 3})
    cfg = json.loads((tmp_path / "cls" / "config.json").read_text())
    cfg.pop("id2label", None), cfg.pop("label2id", None)
    (tmp_path / "cls" / "config.json").write_text(json.dumps(cfg))
    assert resolve(d).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}

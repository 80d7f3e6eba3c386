"""Corrupted artifacts, bad inputs and truncation give clear errors and honest results."""
import json
import shutil

import numpy as np
import pytest

import millis
from millis.common.errors import MillisError


@pytest.fixture
def copy(classify_artifact, tmp_path):
    d = tmp_path / "a"
    shutil.copytree(classify_artifact, d)
    return d


def test_corrupted_model_file(copy):
    meta = json.loads((copy / "millis.json").read_text())
    model_file = next(f for f in meta["files"] if f.startswith("model"))
    data = bytearray((copy / model_file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / model_file).write_bytes(bytes(data))
    with pytest.raises(MillisError, match=f"corrupted: {model_file} does not match"):
        millis.load(copy)


def test_missing_file_and_bad_json_and_future_version(copy):
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(MillisError, match="tokenizer/tokenizer.json is missing"):
        millis.load(copy)
    meta = json.loads((copy / "millis.json").read_text())
    (copy / "millis.json").write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(MillisError, match="format version 99"):
        millis.load(copy)
    (copy / "millis.json").write_text("{not json")
    with pytest.raises(MillisError, match="corrupted"):
        millis.load(copy)
    (copy / "millis.json").unlink()
    with pytest.raises(MillisError, match="not a millis artifact"):
        millis.load(copy)
    with pytest.raises(MillisError, match="artifact directory not found"):
        millis.load(copy / "nope")


def test_rewrite_is_atomic_and_replaces(classify_artifact, tmp_path):
    from millis.artifact import store as artifact

    out = tmp_path / "x"
    meta = artifact.read_meta(classify_artifact)
    artifact.write(out, lambda d: (d / "a.txt").write_text("1") and meta)
    assert artifact.read_meta(out).files.keys() == {"a.txt"}

    def boom(d):
        (d / "b.txt").write_text("2")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        artifact.write(out, boom)
    # the previous artifact is intact and no temp dirs are left behind
    assert artifact.read_meta(out).files.keys() == {"a.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


@pytest.mark.parametrize("bad,msg", [([], "no input texts"), ([""], "input 0 is empty"),
                                     (["ok", 3], "input 1 is int"), (["ok", ""], "input 1 is empty")])
def test_bad_inputs(classify_artifact, bad, msg):
    m = millis.load(classify_artifact)
    with pytest.raises(MillisError, match=msg):
        m.predict(bad)


def test_whitespace_is_a_text(classify_artifact):
    """Only "" is empty: a text of spaces runs as its tokens ([CLS] [SEP]), as the server's routes take it."""
    m = millis.load(classify_artifact)
    assert m.predict(["  \n"])[0] == m.predict(["\u200b"])[0]


def test_wrong_task_method(classify_artifact):
    with pytest.raises(MillisError, match="use predict"):
        millis.load(classify_artifact).embed(["x"])


def test_long_text_is_truncated_and_says_so(classify_artifact):
    m = millis.load(classify_artifact)
    long = "where is my card " * 200
    p = m.predict(["short", long])
    assert [x["truncated"] for x in p] == [False, True]
    res = m.run([long])
    assert res.tokens == [m.max_length]


def test_batched_equals_single_and_keeps_order(classify_artifact):
    from millis.common.samples import sample_texts

    from conftest import tolerance

    m = millis.load(classify_artifact)
    texts = sample_texts()[:20]
    batched = m.run(texts, max_batch=7).outputs
    single = np.stack([m.run([t]).outputs[0] for t in texts])
    # dynamic int8 quantizes activations per tensor over the whole batch: close, not bit-equal (within 5% of the
    # logits' range across the texts, where any two rows differ by far more: a row out of order fails)
    np.testing.assert_allclose(batched, single, atol=tolerance(single, m.meta.variant.precision))


def test_open_model_and_optimize_agree_on_max_length(tmp_path):
    """builtin:minilm has 512 positions, but its sentence_bert_config.json says 256: `open_model` (eval,
    serve of a source) and `millis optimize` both cut texts at 256 (one rule: model_max_length)."""
    from millis.artifact.model import open_model
    from millis.common.config import Shape
    from millis.encoder.source import model_max_length, resolve
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize

    src = resolve("builtin:minilm")
    assert src.max_length == 512 and model_max_length(src) == 256
    assert model_max_length(src, 300) == 300                      # asked for: up to the position limit
    with pytest.raises(MillisError, match="exceeds the model's limit 512"):
        model_max_length(src, 513)
    model = open_model("builtin:minilm")
    assert model.max_length == 256 and model.encoder.max_length == 256
    assert model.run(["card " * 400]).tokens == [256]             # the text is cut where optimize cuts it
    with pytest.raises(MillisError, match="longer than the model's max length 256"):
        optimize(OptimizeConfig(source="builtin:minilm", task="embed", out=str(tmp_path / "a"),
                                target=Shape(1, 384)))
    tiny = resolve("tiny:bert")  # no sentence-transformers config: the tokenizer's 128 (of 130 positions), as ST
    assert open_model("tiny:bert").max_length == model_max_length(tiny) == 128 and tiny.max_length == 130


@pytest.mark.parametrize("problem_type, labels", [("multi_label_classification", 3), ("regression", 1), ("", 1)])
def test_scores_follow_the_configs_problem_type(tmp_path, problem_type, labels):
    """As HF's text-classification pipeline: a sigmoid per label for a multi-label model (it was a softmax over
    the labels), a regression's raw value, a one-logit model's sigmoid (predict() gave a softmax over one label:
    always 1.0); the library and the server's /v1/classify agree."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from millis.encoder.tiny import build_tiny
    from millis.artifact.model import open_model
    from millis.serve.schemas import classify_response

    src = build_tiny("bert")
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_labels = labels
    cfg.id2label = {i: f"l{i}" for i in range(labels)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    if problem_type:
        cfg.problem_type = problem_type
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_config(cfg).eval()  # initializer_range 0.2: logits of -0.1..1.5
    hf.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path)
    texts = ["where is my card?", "the markets fell"]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = hf(**tok(texts, padding=True, return_tensors="pt")).logits.double().numpy()
    want = logits if problem_type == "regression" else 1 / (1 + np.exp(-logits))
    model = open_model(str(tmp_path), task="classify")
    got = model.predict(texts)
    np.testing.assert_allclose([[r["probs"][f"l{j}"] for j in range(labels)] for r in got], want, atol=1e-4)
    served = classify_response([np.asarray(r["logits"]) for r in got], model.id2label, labels, False,
                               [False, False], "m", 0, model.problem_type)
    np.testing.assert_allclose([[t["score"] for t in sorted(d["top_k"], key=lambda t: t["label"])] if labels > 1
                                else [d["score"]] for d in served["data"]], want, atol=1e-4)


def test_a_dynamic_int8_artifact_gives_each_text_its_own_result(tmp_path, quick_measure):
    """ORT's dynamic int8 shares one activation scale across a call's rows: the server runs it one row a call, and
    so does the API (`Model.run`, which `millis eval` and `millis predict` use): a text's vector is the one it gets
    alone, whatever else is passed with it (it moved with its batch-mates, as on the server before)."""
    from millis.common.config import Shape
    from millis.optimize.config import Budget, OptimizeConfig
    from millis.optimize.pipeline import optimize
    from millis.runtimes.base import shares_scales_across_rows

    out = optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "int8"), target=Shape(1, 16),
                                  variants=("ort-int8-dynamic",), recover=False, budget=Budget(min_cosine=-1.0),
                                  measure=quick_measure))
    m = millis.load(out)
    assert m.variant == "ort-int8-dynamic" and shares_scales_across_rows(m.runtime)
    texts = ["where is my card", "the stock markets fell today " * 6, "pin"]
    alone = np.stack([m.embed([t])[0] for t in texts])
    assert np.array_equal(m.embed(texts), alone)
    from millis.artifact.model import run_texts  # the rows in one call: the guard, they do move
    assert not np.array_equal(run_texts(m.runtime, m.encoder, texts).outputs, alone)

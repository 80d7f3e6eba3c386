"""optimize end to end on tiny models; artifacts reload, verify and match the reference."""
import json

import numpy as np
import pytest

import millis
from millis.optimize.config import OptimizeConfig, optimize_config_from_dict
from millis.common.config import Shape
from millis.optimize.pipeline import optimize
from millis.common.samples import sample_texts

from conftest import reference_outputs


def test_classify_artifact_contents(classify_artifact):
    meta = json.loads((classify_artifact / "millis.json").read_text())
    assert meta["format"] == "millis-artifact" and meta["version"] == 1
    assert meta["task"] == "classify" and meta["variant"]["name"] in ("ort-fp32-fused", "ort-int8-dynamic", "torch-fp32")
    assert set(meta["files"]) >= {"tokenizer/tokenizer.json", "report.md", "report.json", "latency.png"}
    assert meta["source"]["sha256"] and meta["hardware"]["cores"] >= 1
    assert set(meta["measured"]["latency"]) == {"b1xs16", "b2xs32"}
    report = json.loads((classify_artifact / "report.json").read_text())
    names = [r["name"] for r in report["variants"]]
    assert names == ["torch-fp32", "ort-fp32-fused", "ort-int8-dynamic"]
    assert all(r["latency"]["b1xs16"]["n"] >= 3 for r in report["variants"])
    # the recipe in millis.json rebuilds the same config
    assert optimize_config_from_dict(meta["config"]).variants == ("ort-fp32-fused", "ort-int8-dynamic")
    assert (classify_artifact / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_loaded_artifact_matches_reference(classify_artifact, tiny_dirs):
    m = millis.load(classify_artifact)
    texts = sample_texts()[:16]
    ref = reference_outputs(tiny_dirs["bert"], "classify", texts)
    preds = m.predict(texts)
    logits = np.array([p["logits"] for p in preds])
    np.testing.assert_allclose(logits, ref, atol=0.05)
    assert [p["label"] for p in preds] == [m.id2label[int(i)] for i in ref.argmax(1)]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_embed_pipeline_other_families(tmp_path, tiny_dirs, quick_measure, family):
    out = optimize(OptimizeConfig(source=f"tiny:{family}", task="embed", out=str(tmp_path / family),
                                  variants=("ort-fp32-fused", "ov-int8"), target=Shape(1, 16), measure=quick_measure))
    m = millis.load(out)
    texts = sample_texts()[:12]
    emb = m.embed(texts)
    ref = reference_outputs(tiny_dirs[family], "embed", texts)
    assert emb.shape == ref.shape
    assert (emb * ref).sum(1).min() > 0.98  # both are normalised


def test_selection_respects_the_budget(tmp_path, tiny_dirs, quick_measure):
    """An impossible budget leaves only the exact variants: int8 must not be chosen."""
    from millis.optimize.config import Budget

    out = optimize(OptimizeConfig(source="tiny:bert", task="classify", out=str(tmp_path / "a"),
                                  variants=("ort-int8-dynamic",), target=Shape(1, 16), measure=quick_measure,
                                  budget=Budget(max_logit_diff=1e-6)))
    meta = json.loads((out / "millis.json").read_text())
    assert meta["variant"]["name"] == "torch-fp32"
    report = json.loads((out / "report.json").read_text())
    int8 = next(r for r in report["variants"] if r["name"] == "ort-int8-dynamic")
    assert not int8["ok"] and "dlogit" in int8["reason"]
    # and the reference artifact reloads and serves
    assert millis.load(out).predict(["hello"])[0]["label"] in ("negative", "neutral", "positive")


def test_shape_longer_than_model_is_rejected(tmp_path, tiny_dirs):
    from millis.optimize.config import MeasureConfig

    with pytest.raises(millis.MillisError, match="longer than the model's max length"):
        optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "x"), target=Shape(1, 16),
                                measure=MeasureConfig(shapes=(Shape(1, 4096),))))


def test_reference_embed_artifact_keeps_pooling(tmp_path, tiny_dirs, quick_measure):
    """A budget no approximation can meet ships the torch reference; reloaded, it still pools and
    normalises as the sentence-transformers folder declares."""
    from millis.optimize.config import Budget

    out = optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path / "ref"),
                                  variants=("ort-fp32-fused",), target=Shape(1, 16), measure=quick_measure,
                                  budget=Budget(min_cosine=1.01)))
    m = millis.load(out)
    assert m.variant == "torch-fp32"
    texts = sample_texts()[:8]
    np.testing.assert_allclose(m.embed(texts), reference_outputs(tiny_dirs["bert"], "embed", texts), atol=1e-5)

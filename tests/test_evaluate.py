"""millis eval: hand-checked metrics, embedding agreement, and the CLI on real models."""
import json

import numpy as np
import pytest

from millis.cli.main import main
from millis.common.errors import MillisError
from millis.evaluate.run import EvalConfig, classification_metrics, embedding_agreement, evaluate


def test_classification_metrics_by_hand():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "d", "c"]  # "d" is predicted once but never true
    m = classification_metrics(y_true, y_pred)
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    pc = m["per_class"]
    assert list(pc) == ["a", "b", "c", "d"]
    assert pc["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert pc["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["c"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 1.0 + 0.0) / 4)


def test_classification_metrics_rejects_bad_input():
    with pytest.raises(MillisError, match="equal, non-empty"):
        classification_metrics(["a"], ["a", "b"])
    with pytest.raises(MillisError, match="equal, non-empty"):
        classification_metrics([], [])


def test_embedding_agreement():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 16)).astype(np.float32)
    same = embedding_agreement(ref, ref.copy())
    assert same["cos_min"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0 and same["top10_overlap"] == 1.0
    assert same["n"] == 40
    scaled = embedding_agreement(ref, 3 * ref)  # cosine ignores scale
    assert scaled["nn_agreement"] == 1.0 and scaled["cos_min"] == pytest.approx(1.0)
    noisy = embedding_agreement(ref, ref + rng.normal(scale=0.7, size=ref.shape))
    assert noisy["nn_agreement"] < 1.0 and noisy["top10_overlap"] < 1.0 and noisy["cos_mean"] < 0.99
    permuted = embedding_agreement(ref, ref[rng.permutation(40)])
    assert permuted["nn_agreement"] < noisy["nn_agreement"] and permuted["cos_mean"] < 0.5
    small = embedding_agreement(ref[:4], ref[:4])
    assert "top3_overlap" in small  # k shrinks to n - 1
    assert "nn_agreement" not in embedding_agreement(ref[:1], ref[:1])
    with pytest.raises(MillisError, match="shapes differ"):
        embedding_agreement(ref, ref[:, :8])


def test_cli_eval_on_a_trained_model(trained_classifier, topics_data, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", str(trained_classifier), "--data", str(topics_data["test"]), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "macro-F1" in text
    assert "bank" in text and "market" in text  # the per-class table
    res = json.loads(out.read_text())
    assert res["variant"] == "torch-fp32" and res["n"] == 60 and res["label_col"] == "label"
    assert f"accuracy {100 * res['accuracy']:.2f}%" in text
    assert sum(m["support"] for m in res["per_class"].values()) == 60


def test_cli_eval_errors(trained_classifier, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nmy card,bank\nthe oil,weather\n")
    assert main(["eval", str(trained_classifier), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "labels the model does not know: ['weather']" in err
    assert main(["eval", str(trained_classifier), "--data", str(tmp_path / "none.csv")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_eval_on_a_source_spec(tmp_path, tiny_dirs):
    """tiny:bert (random weights) evaluates as the torch reference; its three labels are known, and
    the metrics are those of the fp32 HF model's own predictions."""
    from conftest import reference_outputs
    from millis.encoder.source import resolve

    rows = [("where is my card?", "negative"), ("refund?", "positive"), ("ok", "neutral"), ("Hi", "positive")]
    p = tmp_path / "d.csv"
    p.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    res = evaluate(EvalConfig(model="tiny:bert", data=str(p)))
    assert res["variant"] == "torch-fp32" and res["task"] == "classify" and res["n"] == 4
    src = resolve("tiny:bert")
    pred = [src.id2label[int(i)] for i in reference_outputs(src.path, "classify", [t for t, _ in rows]).argmax(1)]
    want = classification_metrics([y for _, y in rows], pred)
    # the guard: the predictions differ between the rows, so predictions in another order (or all one label) score
    # otherwise (they all were "neutral" once, and predictions reversed passed)
    assert len(set(pred)) > 1, pred
    for other in (pred[::-1], pred[1:] + pred[:1], [pred[0]] * len(pred)):
        assert classification_metrics([y for _, y in rows], other) != want, other
    assert res["accuracy"] == want["accuracy"] and list(res["per_class"]) == list(want["per_class"])
    for c, m in want["per_class"].items():
        assert res["per_class"][c] == pytest.approx(m), c


@pytest.fixture(scope="module")
def embed_artifact(tmp_path_factory, tiny_dirs, quick_measure):
    from millis.optimize.config import OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

    return optimize(OptimizeConfig(source="tiny:bert", task="embed", out=str(tmp_path_factory.mktemp("e") / "a"),
                                   variants=("ort-int8-dynamic",), target=Shape(1, 16), measure=quick_measure))


def test_eval_on_an_embed_artifact(embed_artifact, tmp_path, capsys):
    from millis.common.samples import sample_texts

    texts = [t for t in sample_texts() if "," not in t and '"' not in t][:30]
    csv = tmp_path / "t.csv"
    csv.write_text("text\n" + "\n".join(texts) + "\n")
    res = evaluate(EvalConfig(model=str(embed_artifact), data=str(csv)))
    assert res["task"] == "embed" and res["n"] == 30
    assert {"cos_min", "cos_mean", "nn_agreement", "top10_overlap"} <= set(res)
    assert 0.9 < res["cos_min"] <= res["cos_mean"] <= 1.0 + 1e-6
    # a JSONL file of the same texts is read by its text column, not as raw lines
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    res_jl = evaluate(EvalConfig(model=str(embed_artifact), data=str(jl)))
    assert res_jl["n"] == 30 and res_jl["cos_min"] == pytest.approx(res["cos_min"], abs=1e-6)
    assert main(["eval", str(embed_artifact), "--data", str(csv)]) == 0
    assert "agreement with fp32: cos_min" in capsys.readouterr().out


def test_embed_eval_needs_the_fp32_source(embed_artifact, tmp_path):
    import shutil

    art = tmp_path / "a"
    shutil.copytree(embed_artifact, art)
    meta = json.loads((art / "millis.json").read_text())
    assert meta["variant"]["name"] != "torch-fp32"  # an ONNX variant: agreement needs the fp32 source
    meta["source"]["path"] = str(tmp_path / "gone")
    (art / "millis.json").write_text(json.dumps(meta))
    txt = tmp_path / "t.txt"
    txt.write_text("where is my card?\nrefund?\n")
    with pytest.raises(MillisError, match="fp32 source .*gone is gone"):
        evaluate(EvalConfig(model=str(art), data=str(txt)))


def test_eval_warns_on_the_rows_that_selected_the_model(tmp_path, trained_classifier, topics_data, quick_measure,
                                                        capsys):
    """optimize records the sha256 of its selection data: `millis eval ART --data` on that file (any copy of it)
    warns and says so in its JSON; on the test file it does not. A model from `millis train` on its validation
    rows alike."""
    import shutil
    from dataclasses import replace

    from millis.artifact.validation import VALIDATION_FILE
    from millis.common.config import Shape
    from millis.common.files import file_sha256
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize

    dev = tmp_path / "dev.csv"
    dev.write_text("".join(topics_data["test"].read_text().splitlines(keepends=True)[:31]))
    art = optimize(OptimizeConfig(source=str(trained_classifier), task="classify", out=str(tmp_path / "art"),
                                  target=Shape(1, 16), variants=("ort-fp32-fused",), data=str(dev), recover=False,
                                  measure=replace(quick_measure, threads=1, serve_mix=0)))
    recorded = json.loads((art / "millis.json").read_text())["measured"]["selection_sha256"]
    assert recorded == [file_sha256(dev), file_sha256(trained_classifier / VALIDATION_FILE)]
    copy = tmp_path / "copy" / "renamed.csv"
    copy.parent.mkdir()
    shutil.copy(dev, copy)
    lines = topics_data["test"].read_text().splitlines(keepends=True)
    rest = tmp_path / "rest.csv"  # the test rows selection did not read (test.csv holds dev's rows: it warns too)
    rest.write_text("".join(lines[:1] + lines[31:]))
    for data, seen in ((dev, True), (copy, True), (trained_classifier / VALIDATION_FILE, True),
                       (topics_data["test"], True), (rest, False)):
        res = tmp_path / "res.json"
        assert main(["eval", str(art), "--data", str(data), "--json", str(res), "--threads", "1"]) == 0
        err = capsys.readouterr().err
        assert json.loads(res.read_text())["seen_by_selection"] is seen
        assert ("warning: " in err and f"{data} holds the rows that selected this model" in err) is seen, err
    crlf = tmp_path / "crlf.csv"  # the selection rows saved again: other bytes, the same rows (no warning before)
    crlf.write_bytes(dev.read_bytes().replace(b"\n", b"\r\n") + b"a new row,bank\r\n")
    res = evaluate(EvalConfig(model=str(art), data=str(crlf), threads=1))
    assert res["seen_by_selection"] is True and res["selection_rows"] >= 30
    on_val = evaluate(EvalConfig(model=str(trained_classifier), data=str(trained_classifier / VALIDATION_FILE)))
    assert on_val["seen_by_selection"] is True
    assert evaluate(EvalConfig(model=str(trained_classifier), data=str(topics_data["test"])))["seen_by_selection"] \
        is False


def test_eval_finds_selection_rows_by_content_and_the_training_file(tmp_path, trained_classifier, topics_data,
                                                                    capsys):
    """The validation rows saved again (CRLF, as CSV, another path): other bytes, the same rows, so still no test
    score; a file holding some of them says how many. The model's own training file warns too; the test file
    does neither."""
    from millis.artifact.validation import read_validation

    val = read_validation(trained_classifier)
    rows = [f"{t},{y}" for t, y in zip(val.texts, val.labels)]
    again = tmp_path / "again.csv"
    again.write_bytes(("text,label\r\n" + "\r\n".join(rows) + "\r\n").encode())
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(topics_data["test"].read_text() + "\n".join(rows[:3]) + "\n")
    for data, seen, n_rows, trained in ((again, True, len(rows), False), (mixed, True, 3, False),
                                        (topics_data["train"], True, 20, True),  # the rows held out of it, too
                                        (topics_data["test"], False, 0, False)):
        res = tmp_path / "res.json"
        assert main(["eval", str(trained_classifier), "--data", str(data), "--json", str(res), "--threads", "1"]) == 0
        err, got = capsys.readouterr().err, json.loads(res.read_text())
        assert (got["seen_by_selection"], got["selection_rows"], got["trained_on"]) == (seen, n_rows, trained), data
        assert (f"holds the rows that selected this model ({n_rows} of its" in err) is seen, err
        assert (f"{data} is the file this model (or the model it was built from) trained on" in err) is trained, err

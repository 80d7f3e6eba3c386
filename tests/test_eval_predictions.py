"""`millis eval --predictions FILE`: one JSON line per evaluated row, checked against transformers' own model, the
printed figures and the data file; the refused paths; and the atomic write."""
import json
import os
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

from millis.cli.main import config_from_argv, main
from millis.common.errors import MillisError
from millis.evaluate.run import EvalConfig, evaluate

# tiny:bert's random weights predict more than one label over these (test_evaluate's guard, here per row)
ROWS = [("where is my card?", "negative"), ("refund?", "positive"), ("ok", "neutral"), ("Hi", "positive"),
        ("my card was declined again", "negative"), ("thanks a lot", "positive")]


def read_jsonl(path):
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_predictions_are_the_hf_models_row_by_row(tmp_path, tiny_dirs, capsys):
    """Each line is its row (in the data's order, with its text, gold label and file line) and the label transformers'
    own model predicts for that text, with its softmax probability; the lines' accuracy is the printed one."""
    from conftest import reference_outputs
    from millis.encoder.source import resolve

    data = tmp_path / "d.jsonl"  # JSON Lines with a blank line: `line` counts file lines, `row` data rows
    lines = [json.dumps({"text": t, "label": y}) for t, y in ROWS]
    data.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    out, res_file = tmp_path / "preds.jsonl", tmp_path / "res.json"
    assert main(["eval", "tiny:bert", "--data", str(data), "--predictions", str(out), "--json", str(res_file),
                 "--threads", "1"]) == 0
    text = capsys.readouterr().out
    res, got = json.loads(res_file.read_text()), read_jsonl(out)

    src = resolve("tiny:bert")
    logits = reference_outputs(src.path, "classify", [t for t, _ in ROWS])
    want = [src.id2label[int(i)] for i in logits.argmax(1)]
    assert len(set(want)) > 1, want  # else a constant or shifted prediction would pass
    assert len(got) == len(ROWS) == res["n"]
    assert [r["row"] for r in got] == list(range(len(ROWS)))
    assert [r["line"] for r in got] == [1, 2, 4, 5, 6, 7]
    assert [(r["text"], r["label"]) for r in got] == ROWS
    assert [r["predicted"] for r in got] == want
    probs = softmax(logits.astype(np.float64))
    assert [r["score"] for r in got] == pytest.approx([float(p.max()) for p in probs], abs=1e-4)
    assert [r["correct"] for r in got] == [y == p for (_, y), p in zip(ROWS, want)]
    assert [r["truncated"] for r in got] == [False] * len(ROWS)
    assert set(got[0]) == {"row", "line", "text", "label", "predicted", "score", "correct", "truncated"}
    accuracy = sum(r["correct"] for r in got) / len(got)
    assert 0 < accuracy < 1 and accuracy == res["accuracy"]
    assert f"accuracy {100 * accuracy:.2f}%" in text
    assert res["predictions"] == str(out) and f"per-row predictions: {out} ({len(ROWS)} rows)" in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # --limit: the first N rows, as many lines as the rows reported
    assert main(["eval", "tiny:bert", "--data", str(data), "--predictions", str(out), "--limit", "3",
                 "--json", str(res_file), "--threads", "1"]) == 0
    assert "3 rows" in capsys.readouterr().out and json.loads(res_file.read_text())["n"] == 3
    limited = read_jsonl(out)  # the same rows; a score may differ in its last bits (other batches, other padding)
    assert [{**r, "score": 0} for r in limited] == [{**r, "score": 0} for r in got[:3]]
    assert [r["score"] for r in limited] == pytest.approx([r["score"] for r in got[:3]], abs=1e-5)


def test_predictions_of_a_trained_model_agree_with_its_figures(tmp_path, trained_classifier, topics_data):
    """60 rows of the test file, each cut to 4 tokens: every line says truncated, their count and accuracy are the
    result's, the per-class supports are the gold labels', and the texts are the file's rows in order."""
    out = tmp_path / "p.jsonl"
    res = evaluate(EvalConfig(model=str(trained_classifier), data=str(topics_data["test"]), threads=1, max_length=4),
                   predictions=str(out))
    got = read_jsonl(out)
    file_rows = [line.rsplit(",", 1) for line in topics_data["test"].read_text().splitlines()[1:]]
    assert [[r["text"], r["label"]] for r in got] == file_rows and len(got) == res["n"] == 60
    assert [r["line"] for r in got] == list(range(2, 62))
    assert sum(r["truncated"] for r in got) == res["truncated"] == 60
    assert sum(r["correct"] for r in got) / 60 == res["accuracy"]
    for c, m in res["per_class"].items():
        assert sum(r["label"] == c for r in got) == m["support"]
        assert sum(r["predicted"] == c and r["correct"] for r in got) == round(m["recall"] * m["support"])
    assert all(0.5 <= r["score"] <= 1.0 for r in got)  # two labels: the argmax's probability
    assert res["predictions"] == str(out)


def test_predictions_path_errors(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,positive\n")
    before = data.read_bytes()
    missing = tmp_path / "no" / "such" / "p.jsonl"
    assert main(["eval", "tiny:bert", "--data", str(data), "--predictions", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --predictions {missing}: directory {missing.parent} does not exist\n"
    for same in (str(data), str(tmp_path / "sub" / ".." / "d.csv")):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main(["eval", "tiny:bert", "--data", str(data), "--predictions", same]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --predictions {same}: is the file evaluated (--data {data})"), err
    link = tmp_path / "link.csv"  # another name of the same file
    os.link(data, link)
    with pytest.raises(MillisError, match="is the file evaluated"):
        config_from_argv(["eval", "tiny:bert", "--data", str(data), "--predictions", str(link)])
    with pytest.raises(MillisError, match=r"^--json .*: is the file evaluated \(--data"):
        config_from_argv(["eval", "tiny:bert", "--data", str(data), "--json", str(data)])
    with pytest.raises(MillisError, match="--json .* and --predictions .* name one file"):
        config_from_argv(["eval", "tiny:bert", "--data", str(data), "--json", str(tmp_path / "r"),
                          "--predictions", str(tmp_path / "r")])
    with pytest.raises(MillisError, match="--predictions .*: is a directory"):
        config_from_argv(["eval", "tiny:bert", "--data", str(data), "--predictions", str(tmp_path)])
    text = tmp_path / "t.txt"
    text.write_text("once upon a time\n")
    assert main(["eval", "tiny:bert", "--text", str(text), "--predictions", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --predictions (a classifier's per-row predictions on --data) does not apply to "
                          "--text (a decoder's perplexity)") and err.count("\n") == 1
    monkeypatch.setenv("MILLIS_EVAL_PREDICTIONS", str(data))  # the variable is named where it gave the path
    with pytest.raises(MillisError, match=f"^MILLIS_EVAL_PREDICTIONS {data}: is the file evaluated"):
        config_from_argv(["eval", "tiny:bert", "--data", str(data)])
    monkeypatch.setenv("MILLIS_EVAL_PREDICTIONS", str(tmp_path / "p.jsonl"))
    assert config_from_argv(["eval", "tiny:bert", "--data", str(data)])[1][1].predictions == str(tmp_path / "p.jsonl")
    assert data.read_bytes() == before and not (tmp_path / "p.jsonl").exists()


def test_predictions_of_an_embedding_model_are_refused(tmp_path, monkeypatch):
    import millis.artifact.model

    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\n")
    monkeypatch.setattr(millis.artifact.model, "open_model", lambda *a, **k: SimpleNamespace(task="embed",
                                                                                            max_length=128))
    with pytest.raises(MillisError, match="--predictions: emb is an embed model; per-row predictions are a "
                                          "classifier's"):
        evaluate(EvalConfig(model="emb", data=str(data)), predictions=str(tmp_path / "p.jsonl"))
    assert not (tmp_path / "p.jsonl").exists()


def test_a_failed_eval_leaves_no_partial_predictions_file(tmp_path, tiny_dirs, monkeypatch, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS))
    out = tmp_path / "p.jsonl"
    out.write_text("an older file\n")
    bad = tmp_path / "bad.csv"  # the eval fails (a label the model does not know): no file is written
    bad.write_text("text,label\nmy card,weather\n")
    assert main(["eval", "tiny:bert", "--data", str(bad), "--predictions", str(tmp_path / "new.jsonl")]) == 2
    assert "labels the model does not know" in capsys.readouterr().err
    assert not (tmp_path / "new.jsonl").exists()

    real = pathlib.Path.write_text

    def disk_full(self, text, *a, **k):  # half the predictions reach the disk, then the write fails
        if self.parent != tmp_path:
            return real(self, text, *a, **k)
        real(self, text[:len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        evaluate(EvalConfig(model="tiny:bert", data=str(data), threads=1), predictions=str(out))
    monkeypatch.undo()
    assert out.read_text() == "an older file\n"  # the older file stays whole, and no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "d.csv", "p.jsonl"]

    rename = os.replace

    def no_rename(src, dst):
        if pathlib.Path(dst) != out:
            return rename(src, dst)
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="cross-device"):
        evaluate(EvalConfig(model="tiny:bert", data=str(data), threads=1), predictions=str(out))
    monkeypatch.undo()
    assert out.read_text() == "an older file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "d.csv", "p.jsonl"]
    evaluate(EvalConfig(model="tiny:bert", data=str(data), threads=1), predictions=str(out))
    assert len(read_jsonl(out)) == len(ROWS)

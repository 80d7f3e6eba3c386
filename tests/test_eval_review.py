"""Review 2026-12-06 of `millis eval`: rows the model trained on are counted (exactly and ignoring spacing and
case), an optimize --compress student's training file is recorded and checked, an embedder that is its own
reference reports no agreement, and numeric labels keep their order."""
import json
import shutil

import pytest

from millis.cli.main import main
from millis.common.errors import MillisError
from millis.common.files import file_sha256
from millis.evaluate.run import EvalConfig, classification_metrics, evaluate

ONE_THREAD = {"threads": 1, "lr": 3e-3, "batch_size": 16, "patience": 10}


def test_eval_counts_the_training_rows_in_the_file_exactly_and_loosely(tmp_path, trained_classifier, topics_data,
                                                                       capsys):
    from millis.artifact.validation import read_validation
    from millis.common.readers import read_labeled

    held = set(read_validation(trained_classifier).texts)
    train = read_labeled(topics_data["train"])
    rows = [(t, y) for t, y in zip(train.texts, train.labels) if t not in held]  # rows it trained on
    exact, loose = rows[:2], rows[2:5]
    new = [("pin pin pin today", "bank"), ("oil oil why", "market"), ("atm atm atm", "bank"), ("bond bond", "market")]
    data = tmp_path / "mixed.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in exact + new)
                    + "".join(f"  {t.upper().replace(' ', '   ')} ,{y}\n" for t, y in loose))
    out = tmp_path / "res.json"
    assert main(["eval", str(trained_classifier), "--data", str(data), "--json", str(out), "--threads", "1"]) == 0
    res, err = json.loads(out.read_text()), capsys.readouterr().err
    assert (res["n"], res["train_rows"], res["train_rows_normalized"]) == (9, 2, 5)
    assert (res["selection_rows"], res["selection_rows_normalized"], res["trained_on"]) == (0, 0, False)
    assert f"warning: 5 of the 9 rows of {data} (2 exactly, 3 more ignoring spacing and case) are rows this model" \
        in err, err
    assert res["warnings"] and res["truncated"] == 0 and res["max_length"] == 128


def test_eval_checks_the_training_file_of_an_artifacts_student(tmp_path, classify_artifact):
    """optimize --compress records the file its student trained on (CompressedStudent.data and its sha256): `millis
    eval` on that file is no test score, even with the student's directory gone from the cache."""
    art = tmp_path / "art"
    shutil.copytree(classify_artifact, art)
    data = tmp_path / "student_data.csv"
    data.write_text("text,label\nwhere is my card?,negative\nrefund please,positive\nok then,neutral\n")
    meta = json.loads((art / "millis.json").read_text())
    student = {"recipe": {"name": "l-half", "layers": 0.5}, "model": str(tmp_path / "gone"), "sha256": "0" * 64,
               "layers": 1, "heads": 4, "intermediate": 64, "data": str(data), "data_sha256": file_sha256(data)}
    meta["compressed"] = meta["variant"]["compressed"] = student
    (art / "millis.json").write_text(json.dumps(meta))
    res = evaluate(EvalConfig(model=str(art), data=str(data), threads=1))
    assert res["trained_on"] is True and res["train_rows"] == 3
    other = tmp_path / "other.csv"  # two of its rows, another file: counted by row
    other.write_text("text,label\nWhere is my  card?,negative\nrefund please,positive\nsomething else,neutral\n")
    res = evaluate(EvalConfig(model=str(art), data=str(other), threads=1))
    assert (res["trained_on"], res["train_rows"], res["train_rows_normalized"]) == (False, 1, 2)


@pytest.fixture(scope="module")
def embed_student(tmp_path_factory, tiny_dirs):
    from millis.common.samples import sample_texts
    from millis.train.distill import distill, distill_config

    d = tmp_path_factory.mktemp("emb")
    texts = d / "texts.txt"
    texts.write_text("\n".join(sample_texts()))
    return distill(distill_config("tiny:bert", str(texts), out=str(d / "student"), train={**ONE_THREAD, "epochs": 1},
                                  layers=1, task="embed")), texts


def test_an_embedder_that_is_its_own_reference_reports_no_agreement(tmp_path, embed_student, capsys):
    """A plain model compared with itself agrees by construction: no cos_min 1.0 as if measured. With labels, the
    leave-one-out nearest-neighbour label accuracy is a figure of its own."""
    from millis.common.samples import sample_texts

    student, _ = embed_student
    texts = [t for t in sample_texts() if "," not in t and '"' not in t][:12]
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"{t},{'ab'[i % 2]}\n" for i, t in enumerate(texts)))
    res = evaluate(EvalConfig(model=str(student), data=str(data), threads=1))
    assert not {"cos_min", "cos_mean", "nn_agreement"} & set(res)  # was 1.0, 1.0, 1.0: itself against itself
    assert res["task"] == "embed" and res["reference"] == "self" and res["n"] == 12
    assert 0.0 <= res["nn_label_accuracy"] <= 1.0 and res["label_col"] == "label"
    err = capsys.readouterr().err
    assert "note: the model is its own fp32 reference: there is nothing to compare" in err
    share = f"{100 * res['nn_label_accuracy']:.2f}%"
    assert f"note: nearest-neighbour label accuracy (leave-one-out, 'label') {share} over 12 rows" in err


def test_an_embedding_students_training_texts_are_recorded_and_checked(embed_student):
    """distill --task embed records its file's sha256 (a classifier's record always had it): eval on it says so."""
    from millis.artifact.meta import read_train_meta
    from millis.common.files import hash_files

    student, texts = embed_student
    assert read_train_meta(student).data.sha256 == hash_files([texts])
    res = evaluate(EvalConfig(model=str(student), data=str(texts), threads=1))
    assert res["trained_on"] is True and res["train_rows"] == res["n"]


def test_numeric_labels_in_the_per_class_report_keep_their_order():
    m = classification_metrics(["10", "2", "1", "2"], ["2", "10", "1", "2"])
    assert list(m["per_class"]) == ["1", "2", "10"]


def test_eval_max_length_overrides_a_models_own_and_not_an_artifacts(tmp_path, trained_classifier, topics_data,
                                                                     classify_artifact):
    res = evaluate(EvalConfig(model=str(trained_classifier), data=str(topics_data["test"]), threads=1, max_length=4))
    assert res["max_length"] == 4 and res["truncated"] == 60  # every text is longer than [CLS] + 2 tokens + [SEP]
    with pytest.raises(MillisError, match=r"--max-length 4: .* is an artifact built for \d+ tokens"):
        evaluate(EvalConfig(model=str(classify_artifact), data=str(topics_data["test"]), max_length=4))

"""Review 2026-12-06 of `optimize --compress`: the teacher's file under another name is the teacher's file, no
student trains on the fidelity gate's texts, --compress-data that is a file selection judges is refused, and the
artifact records the file its student trained on."""
import json
import shutil

import pytest

from millis.common.errors import MillisError
from millis.encoder.source import resolve

from test_compress import fake_students


def test_a_renamed_copy_of_the_teachers_file_is_the_teachers_file(tmp_path, trained_classifier, topics_data,
                                                                 monkeypatch):
    """The same bytes under another name (TrainData.holds): the students repeat the teacher's split, where they used
    to split it anew and fail ("too few rows to hold out a validation set") after everything was built."""
    from millis.optimize.compress import candidates, is_teacher_data, teacher_split

    src = resolve(str(trained_classifier))
    renamed = tmp_path / "renamed.csv"
    shutil.copy(topics_data["train"], renamed)
    assert is_teacher_data(src, str(renamed)) and not is_teacher_data(src, str(topics_data["test"]))
    assert teacher_split(src, str(renamed)) == teacher_split(src, "") != {}
    trained, holdout_checked = fake_students(monkeypatch, trained_classifier)
    candidates(src, "classify", "quick", str(renamed), "text", lambda m: None)
    assert trained[0][0] == str(renamed) and holdout_checked == [trained_classifier]


def test_embedding_students_never_train_on_the_fidelity_texts(tmp_path, tiny_dirs, monkeypatch):
    from millis.common.readers import read_texts
    from millis.optimize.compress import candidates

    teacher = resolve("tiny:bert")
    monkeypatch.setenv("MILLIS_CACHE", str(tmp_path / "cache"))  # the copy without those texts goes there
    texts = [f"text number {i} about the card" for i in range(30)]
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    trained, _ = fake_students(monkeypatch, teacher.path)
    msgs = []
    fidelity = ("Text number 3 about  the card", texts[7], "not in the file")  # spacing and case do not matter
    candidates(teacher, "embed", "quick", str(data), "text", msgs.append, None, fidelity)
    used = read_texts(trained[0][0], trained[0][1].train.text_col)
    assert len(used) == 28 and texts[3] not in used and texts[7] not in used
    assert any(m.startswith(f"compress: dropped 2 of the 30 rows of {data}: they are among the fidelity gate's texts")
               for m in msgs), msgs


def test_compress_data_that_judges_the_variants_is_refused(tmp_path, trained_classifier, monkeypatch):
    from millis.artifact.validation import VALIDATION_FILE, read_validation
    from millis.optimize.compress import candidates

    src = resolve(str(trained_classifier))
    fake_students(monkeypatch, trained_classifier)
    copy = tmp_path / "val.jsonl"  # the teacher's kept validation rows (selection's rows), under another name
    shutil.copy(trained_classifier / VALIDATION_FILE, copy)
    with pytest.raises(MillisError, match=r"--compress-data .*val\.jsonl is .*validation\.jsonl \(the same bytes\)"):
        candidates(src, "classify", "quick", str(copy), "text", lambda m: None, read_validation(trained_classifier))
    given = tmp_path / "sample.txt"  # a file named by --data / --sample-texts
    given.write_text("some text\nanother text\n")
    with pytest.raises(MillisError, match=r"--compress-data .*sample\.txt is .*sample\.txt"):
        candidates(resolve("tiny:bert"), "embed", "quick", str(given), "text", lambda m: None, None, (),
                   (str(given),))


def test_the_artifact_records_the_file_its_student_trained_on(tmp_path, trained_classifier, topics_data,
                                                               monkeypatch):
    from millis.artifact.meta import CompressedStudent
    from millis.common.files import file_sha256
    from millis.common.schema import from_dict
    from millis.optimize import compress
    from millis.optimize.compress import COMPRESS_PRESETS, judge_compressed

    monkeypatch.setattr(compress, "candidates", lambda *a, **k: [(COMPRESS_PRESETS["quick"][0], trained_classifier)])
    seen = []
    judge_compressed("classify", "quick", str(topics_data["test"]), "text", resolve(str(trained_classifier)),
                     tmp_path, lambda: [], lambda v, builder, compressed: seen.append(compressed), lambda m: None)
    assert len(seen) == len(compress.COMPRESS_VARIANTS)
    student = from_dict(CompressedStudent, json.loads(json.dumps(seen[0])), "the student", strict=True)
    assert student.data == str(topics_data["test"]) and student.data_sha256 == file_sha256(topics_data["test"])

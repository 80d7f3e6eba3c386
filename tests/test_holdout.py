"""The validation rows of distill / prune (and train going on from a trained model): never rows the source model
trained on, and the source's own validation rows never train (millis.train.holdout)."""
import json
import shutil
import warnings

import pytest

from millis.artifact.validation import read_validation
from millis.common.errors import MillisError
from millis.common.readers import read_labeled
from millis.encoder.source import resolve
from millis.train.classify import train_config
from millis.train.loop import prepare


def _prepare(source, data, **kw):
    src = resolve(str(source))
    return prepare(_cfg(source, data, **kw), src, classes=["bank", "market"])


def _cfg(source, data, **kw):
    return train_config(str(source), str(data), out="unused", **kw)


def _trains_on(source, td, **kw):
    """The (text, label) rows that train, for the rows prepare read (held_out's training indices)."""
    from millis.train.holdout import held_out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, _, _ = held_out(_cfg(source, td.data.path, **kw), td.data, resolve(str(source)))
    assert len(tr) == len(td.tr_ids)
    return [(td.data.texts[i], td.data.labels[i]) for i in tr]


def _pairs(texts, labels):
    return set(zip(texts, labels))


def _teacher_rows(trained_classifier):
    """(the teacher's validation rows, the rows it trained on), as (text, label) sets."""
    val = read_validation(trained_classifier)
    full = read_labeled(json.loads((trained_classifier / "millis.json").read_text())["data"]["path"])
    held = {json.loads(x)["source_line"] for x in (trained_classifier / "validation.jsonl").read_text().splitlines()}
    assert len(held) == len(val) == 20
    return (_pairs(val.texts, val.labels),
            {(t, y) for t, y, n in zip(full.texts, full.labels, full.lines) if n not in held})


def test_same_training_file_reuses_the_sources_validation_rows(tmp_path, trained_classifier, topics_data):
    """Seed, --val-fraction and --sample differ from the teacher's (trained with seed 0, 10%): the split is still
    the teacher's, so no row it trained on validates the student."""
    judged, trained = _teacher_rows(trained_classifier)
    td = _prepare(trained_classifier, topics_data["train"], seed=1, val_fraction=0.3, sample=150, threads=1)
    assert _pairs(td.val.texts, td.val.labels) == judged and len(td.val) == 20
    assert not _pairs(td.val.texts, td.val.labels) & trained
    assert td.validation == f"the validation rows of {trained_classifier} (held out of this file's rows)"
    # the training rows: the sampled rows less the teacher's validation rows
    assert _trains_on(trained_classifier, td, seed=1, val_fraction=0.3, sample=150) == [
        r for r in zip(td.data.texts, td.data.labels) if r not in judged]
    assert len(td.tr_ids) < 150
    copy = tmp_path / "renamed.csv"  # the same bytes under another name: the same file
    shutil.copy(topics_data["train"], copy)
    td = _prepare(trained_classifier, copy, seed=2, threads=1)
    assert _pairs(td.val.texts, td.val.labels) == judged and "(held out of this file's rows)" in td.validation


def test_another_training_file_keeps_the_sources_rows_apart(tmp_path, trained_classifier, topics_data):
    """Another file (other sha256) holding the teacher's rows but one of its validation rows: held-out rows the
    teacher trained on train instead, and the teacher's validation rows do not train."""
    judged, trained = _teacher_rows(trained_classifier)
    lines = topics_data["train"].read_text().splitlines(keepends=True)
    gone = next(i for i, x in enumerate(lines) if tuple(x.rstrip("\n").rsplit(",", 1)) in judged)
    other = tmp_path / "more.csv"
    other.write_text("".join(lines[:gone] + lines[gone + 1:]) + "card pin today,bank\nstock oil merger,market\n")
    with pytest.warns(UserWarning, match=r"more\.csv: \d+ held-out row\(s\) are rows .* trained on"):
        td = _prepare(trained_classifier, other, seed=5, threads=1)
    val = _pairs(td.val.texts, td.val.labels)
    assert val and not val & trained
    assert td.validation.startswith("10% held out per class, less the rows")
    train = _trains_on(trained_classifier, td, seed=5)
    assert not set(train) & judged and not set(train) & val
    left_out = judged & set(zip(td.data.texts, td.data.labels)) - val
    assert len(train) + len(val) + len(left_out) == len(td.data)  # only teacher validation rows are left out
    assert ("card pin today", "bank") in set(train) | val


def test_the_same_rows_saved_again_keep_the_sources_validation_rows(tmp_path, trained_classifier, topics_data):
    """The teacher's file saved with CRLF line ends (other bytes, the same rows), or with rows added: every
    validation row of the teacher is there, so they stay the validation rows (a new split would keep only those
    the new draw happens to hold out, about a tenth of them)."""
    judged, _ = _teacher_rows(trained_classifier)
    text = topics_data["train"].read_text()
    crlf, more = tmp_path / "crlf.csv", tmp_path / "more.csv"
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    more.write_text(text + "card pin today,bank\n")
    for data in (crlf, more):
        td = _prepare(trained_classifier, data, seed=1, threads=1)
        assert _pairs(td.val.texts, td.val.labels) == judged, data
        assert not set(_trains_on(trained_classifier, td, seed=1)) & judged


def test_split_keeps_every_copy_of_a_text_on_one_side(tmp_path):
    """A text twice in the file (SST-2's train.tsv repeats 366 rows) is held out or trained on whole: never one
    copy in each (its held-out twin would be a trained row). Without duplicates the draw is the old one."""
    from millis.train.holdout import split

    rows = [(f"text {i % 150}", "ab"[i % 2]) for i in range(300)]  # each text twice, its label the same
    path = tmp_path / "dups.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    data = read_labeled(path)
    tr, va = split(data, 0.2, 0)
    assert sorted(tr + va) == list(range(300)) and 50 <= len(va) <= 70
    assert not {data.texts[i] for i in tr} & {data.texts[i] for i in va}
    uniq = tmp_path / "uniq.csv"
    uniq.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    tr, va = split(read_labeled(uniq), 0.25, 3)
    assert va == [6, 10, 11, 12, 15, 16, 19, 23, 29, 30]  # the per-row draw before copies were grouped


def test_unknown_source_training_rows_are_warned_about(tmp_path, trained_classifier, topics_data):
    moved = tmp_path / "teacher"
    shutil.copytree(trained_classifier, moved)
    meta = json.loads((moved / "millis.json").read_text())
    meta["data"]["path"] = str(tmp_path / "gone.csv")
    (moved / "millis.json").write_text(json.dumps(meta))
    judged, _ = _teacher_rows(trained_classifier)
    lines = topics_data["train"].read_text().splitlines(keepends=True)
    gone = next(i for i, x in enumerate(lines) if tuple(x.rstrip("\n").rsplit(",", 1)) in judged)
    other = tmp_path / "more.csv"  # not every validation row of the teacher: a new split
    other.write_text("".join(lines[:gone] + lines[gone + 1:]) + "card pin today,bank\n")
    with pytest.warns(UserWarning, match=r"training file .*gone\.csv is gone or changed: cannot tell which rows"):
        _prepare(moved, other, threads=1)
    with pytest.warns(UserWarning, match=r"training file .*gone\.csv is gone or changed: cannot tell which rows "
                                         r"of --validation .*test\.csv"):
        _prepare(moved, other, validation=str(topics_data["test"]), threads=1)


def test_validation_file_that_is_the_training_file_is_refused(tmp_path, topics_data, tiny_dirs):
    copy = tmp_path / "renamed.csv"
    shutil.copy(topics_data["train"], copy)  # the same bytes under another name
    with pytest.raises(MillisError, match=r"--validation .*renamed\.csv is the training file .*train\.csv "
                                          r"\(the same sha256\)"):
        _prepare("tiny:bert", topics_data["train"], validation=str(copy))


def test_validation_file_sharing_texts_warns_and_drops_rows_the_source_trained_on(tmp_path, trained_classifier,
                                                                                  topics_data):
    """--validation rows the source trained on are dropped, said so; so are rows of the training file itself."""
    judged, trained = _teacher_rows(trained_classifier)
    some = sorted(trained)[:3]
    lines = topics_data["train"].read_text().splitlines(keepends=True)
    other = tmp_path / "other.csv"  # the teacher's file less those rows: they are no training rows here
    other.write_text("".join(x for x in lines if tuple(x.rstrip("\n").rsplit(",", 1)) not in set(some)))
    val = tmp_path / "val.csv"
    val.write_text(topics_data["test"].read_text() + "".join(f"{t},{y}\n" for t, y in some))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        td = _prepare(trained_classifier, other, validation=str(val), threads=1)
    said = [str(w.message) for w in caught]
    assert any(m.startswith(f"dropped 3 of the 63 rows of --validation {val}: ") and "trained on them" in m
               for m in said), said
    assert len(td.val) == 60 and not _pairs(td.val.texts, td.val.labels) & trained
    only = tmp_path / "only.csv"
    only.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in some))
    with pytest.raises(MillisError, match=r"every row of --validation .*only\.csv is a row .* trained on"):
        _prepare(trained_classifier, other, validation=str(only), threads=1)


def test_validation_rows_that_are_training_rows_are_dropped_or_refused(tmp_path, topics_data, tiny_dirs):
    """A --validation row whose text is a training row's (ignoring spacing and case) is dropped with a warning
    (a `warning:` line through progress); a file mostly of them is an error naming the count."""
    train = read_labeled(topics_data["train"])
    test_lines = topics_data["test"].read_text().splitlines(keepends=True)
    shared = [f"  {t.upper()} ,{y}\n" for t, y in list(zip(train.texts, train.labels))[:3]]  # other spacing and case
    mostly = tmp_path / "mostly.csv"
    mostly.write_text("".join(test_lines[:3]) + "".join(shared))  # header, 2 test rows, 3 training rows
    with pytest.raises(MillisError, match=r"3 of the 5 rows of --validation .*mostly\.csv are training rows of "):
        _prepare("tiny:bert", topics_data["train"], validation=str(mostly))
    val = tmp_path / "val.csv"
    val.write_text("".join(test_lines) + "".join(shared))
    events = []
    td = prepare(_cfg("tiny:bert", topics_data["train"], validation=str(val)), resolve("tiny:bert"),
                 progress=lambda e, f: events.append((e, f)))
    warned = [f["warning:"] for e, f in events if e == "plan" and "warning:" in f]
    assert any(w.startswith(f"dropped 3 of the 63 rows of --validation {val}: their texts are training rows")
               for w in warned), events
    assert len(td.val) == 60 and not {t.casefold() for t in td.val.texts} & {t.casefold() for t in train.texts}

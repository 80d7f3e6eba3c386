"""The validation split a trained model keeps: the rows `millis train` (and distill / prune) held out of
its training data, written beside millis.json so that `millis optimize` can select on them and the
test file stays for `millis eval`.

Format: `validation.jsonl`, one JSON object per row with the training file's own text and label
columns (so `millis eval MODEL --data MODEL/validation.jsonl` reads it like the training file) and
`source_line`, the row's line in the file it came from.
"""
from __future__ import annotations

import json
from pathlib import Path

from millis.artifact.meta import read_train_meta
from millis.artifact.store import verified_train_meta
from millis.common.readers import Labeled, read_labeled

VALIDATION_FILE = "validation.jsonl"
LINE_KEY = "source_line"


def write_validation(model_dir: Path, rows: Labeled) -> Path:
    """Write `rows` (texts, labels, their lines in `rows.path`) as model_dir/validation.jsonl."""
    path = Path(model_dir) / VALIDATION_FILE
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for text, label, line in zip(rows.texts, rows.labels, rows.lines):
            fh.write(json.dumps({rows.text_col: text, rows.label_col: label, LINE_KEY: line},
                                ensure_ascii=False) + "\n")
    return path


def read_validation(model_dir: str | Path) -> Labeled | None:
    """The validation rows a trained model dir keeps, or None (not from `millis train`, or trained before
    the split was kept, or an embedder: only labelled splits are kept). The dir's files are checked against
    their recorded sha256 first: an edited validation.jsonl fails, naming the file."""
    meta = verified_train_meta(model_dir)
    path = Path(model_dir) / VALIDATION_FILE
    if meta is None or not path.is_file():
        return None
    return read_labeled(path, meta.data.text_col, meta.data.label_col)


def selection_files(model_dir: str | Path) -> list[Path]:
    """The files whose rows chose a trained model's best epoch, those still there: its validation.jsonl and
    the --validation file it was read from ([] for a dir `millis train` did not write)."""
    meta = read_train_meta(model_dir)
    if meta is None:
        return []
    files = [Path(model_dir) / VALIDATION_FILE]
    if meta.train_config.get("validation"):  # read from --validation FILE, not held out of the training file
        files.append(Path(meta.train_config["validation"]))
    return [f for f in files if f.is_file()]

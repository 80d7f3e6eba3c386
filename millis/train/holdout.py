"""Which rows a training command validates on, and which it trains on.

`millis train` holds out `--val-fraction` of each class (`split`) or reads `--validation FILE`. A model dir
that millis trained keeps the rows it validated on (validation.jsonl) and its training file's sha256
(millis.json). A command that starts from such a model (distill, prune, or train going on from it) must
not validate on rows that model trained on: they would inflate its score (the teacher's validation
accuracy) and the new model's validation.jsonl, which `millis optimize` selects on. So:
- the same training file (sha256), or one that holds every validation row of the source, and no --validation:
  the source's validation rows are the validation rows, and the rows with their (text, label) do not train;
- another training file: rows whose (text, label) is among the source's validation rows do not train, and
  held-out rows the source trained on go to training instead (when its training file is there, unchanged,
  to tell which rows it trained on; a warning says when it is not);
- --validation FILE: never the training file itself (same sha256), nor a file most of whose rows are training rows
  (the same text, ignoring spacing and case: millis.common.readers.text_key); fewer such rows, and rows the source
  trained on, are dropped from it, with a warning.
Warnings go to `note` (a training command's progress: a `warning:` line), by default warnings.warn.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from millis.artifact.meta import read_train_meta
from millis.artifact.validation import read_validation
from millis.common.errors import MillisError
from millis.common.files import file_sha256
from millis.common.readers import Labeled, read_labeled, rows_of, text_key
from millis.encoder.source import ModelSource
from millis.evaluate.seen import Row, source_lines, trained_rows

Note = Callable[[str], None]  # a warning for the user, one line


def warn(message: str) -> None:
    """The default `note`: a Python warning (a library caller's; the commands pass their progress)."""
    warnings.warn(message, stacklevel=4)


def split(data: Labeled, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, validation) row indices. Rows are drawn by text: every copy of a text lands on one
    side (a duplicate in training would make its held-out twin a trained row; SST-2's train.tsv repeats 366),
    a text's class being its first row's label; a class with one text stays in training."""
    rng = random.Random(seed)
    copies: dict[str, list[int]] = {}
    for i, t in enumerate(data.texts):
        copies.setdefault(t, []).append(i)
    by_class: dict[str, list[list[int]]] = {}
    for rows in copies.values():  # first-seen order: without duplicates, the draws of one row a group
        by_class.setdefault(data.labels[rows[0]], []).append(rows)
    train, val = [], []
    for y in sorted(by_class):
        groups = by_class[y][:]
        rng.shuffle(groups)
        n = len(groups)
        k = int(round(n * fraction)) if n > 1 else 0
        k = min(max(k, 1 if n > 1 else 0), n - 1)
        val += [i for g in groups[:k] for i in g]
        train += [i for g in groups[k:] for i in g]
    return sorted(train), sorted(val)


def pairs(data: Labeled) -> list[Row]:
    return list(zip(data.texts, data.labels))


@dataclass(frozen=True)
class SourceSplit:
    """What a millis-trained source model validated and trained on."""

    spec: str
    val: Labeled                      # its validation.jsonl
    same_data: bool                   # trained on the file --data names (same sha256 and columns), or --data
                                      # holds every one of its validation rows
    trained: frozenset[Row] | None    # the rows it trained on; None: its training file is gone or changed
    data_path: str                    # its training file


def source_split(src: ModelSource, data: Labeled) -> SourceSplit | None:
    """The source's split, None for a model millis did not train (or an embedder: no labelled rows)."""
    meta = read_train_meta(src.path)
    if meta is None or not meta.data.sha256:
        return None
    val = read_validation(src.path)  # hash-checked against millis.json
    if val is None:
        return None
    same_file = meta.data.holds(data.path) and (data.text_col, data.label_col) == (meta.data.text_col,
                                                                                   meta.data.label_col)
    # the same rows saved again (CRLF, a BOM, re-exported) or a file holding them all: its validation rows stay
    # the validation rows (they are rows it never trained on), where a new split would shrink them
    same = same_file or (len(val) > 0 and set(pairs(val)) <= set(pairs(data)))
    path = Path(data.path) if same_file else Path(meta.data.path)
    here = same_file or meta.data.holds(path)
    trained = trained_rows(meta, path, val, source_lines(src.path)) if here else None
    return SourceSplit(src.spec, val, same, trained, meta.data.path)


def held_out(cfg, data: Labeled, src: ModelSource, note: Note = warn) -> tuple[list[int], Labeled, str]:
    """(training row indices of `data`, validation rows, where they came from) for a TrainConfig `cfg`."""
    source = source_split(src, data)
    if cfg.validation:
        return list(range(len(data))), given_validation(cfg, data, source, note), cfg.validation
    if source is not None and source.same_data:
        judged = set(pairs(source.val))
        tr = [i for i, r in enumerate(pairs(data)) if r not in judged]
        val = replace(source.val, text_col=data.text_col, label_col=data.label_col)
        return tr, val, f"the validation rows of {source.spec} (held out of this file's rows)"
    tr, va = split(data, cfg.val_fraction, cfg.seed)
    what = f"{cfg.val_fraction:.0%} held out per class"
    if source is None:
        return tr, rows_of(data, va), what
    rows, judged, trained = pairs(data), set(pairs(source.val)), source.trained or frozenset()
    moved = [i for i in va if rows[i] in trained]
    keep_tr = sorted(i for i in tr + moved if rows[i] not in judged)
    va = [i for i in va if rows[i] not in trained]
    if source.trained is None:
        note(f"{source.spec}'s training file {source.data_path} is gone or changed: cannot tell which rows of "
             f"{data.path} it trained on, so some validation rows may be rows it learnt")
    dropped = len(tr) + len(moved) - len(keep_tr)
    if moved or dropped:
        note(f"{data.path}: {len(moved)} held-out row(s) are rows {source.spec} trained on (they train instead) "
             f"and {dropped} row(s) are among its validation rows (they do not train)")
        what += f", less the rows {source.spec} trained on"
    return keep_tr, rows_of(data, va), what


def given_validation(cfg, data: Labeled, source: SourceSplit | None, note: Note = warn) -> Labeled:
    """The --validation file's rows: not the training file, not mostly training rows, none a training row (the same
    text, ignoring spacing and case) and none the source model trained on."""
    val = read_labeled(cfg.validation, cfg.text_col, data.label_col)
    if file_sha256(cfg.validation) == file_sha256(data.path):
        raise MillisError(f"--validation {cfg.validation} is the training file {data.path} (the same sha256): "
                          f"validation rows must be rows the model does not train on; leave --validation out "
                          f"to hold out --val-fraction of each class")
    training = {text_key(t) for t in data.texts}
    keep = [j for j, t in enumerate(val.texts) if text_key(t) not in training]
    shared = len(val) - len(keep)
    if 2 * shared > len(val):  # the epoch would be chosen on rows it trains on: no validation at all
        raise MillisError(f"{shared} of the {len(val)} rows of --validation {cfg.validation} are training rows of "
                          f"{data.path} (the same text, ignoring spacing and case): validate on rows the model does "
                          f"not train on, or leave --validation out to hold out --val-fraction of each class")
    if shared:
        note(f"dropped {shared} of the {len(val)} rows of --validation {cfg.validation}: their texts are training "
             f"rows of {data.path} (ignoring spacing and case), and accuracy on them is accuracy on trained rows")
        val = rows_of(val, keep)
    if source is None:
        return val
    if source.trained is None:
        note(f"{source.spec}'s training file {source.data_path} is gone or changed: cannot tell which rows of "
             f"--validation {cfg.validation} it trained on, so some may be rows it learnt")
        return val
    keep = [j for j, r in enumerate(pairs(val)) if r not in source.trained]
    if not keep:
        raise MillisError(f"every row of --validation {cfg.validation} is a row {source.spec} trained on: "
                          f"validate on rows it did not see")
    if len(keep) < len(val):
        note(f"dropped {len(val) - len(keep)} of the {len(val)} rows of --validation {cfg.validation}: "
             f"{source.spec} trained on them")
    return rows_of(val, keep)

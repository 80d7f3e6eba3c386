"""Which rows a model saw: the rows it trained on, and the rows that chose it (validation / selection rows).

One place for both readers: `millis train` (millis.train.holdout) keeps the rows a source model trained on out
of a new model's validation rows, and `millis eval` says how many rows of the file it scores a model (or the
model it was built from: a student's teacher, an artifact's source or student) trained on or was chosen by.
Rows match exactly (text, or text and label) and loosely (millis.common.readers.text_key: spacing and case).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from millis.artifact.meta import ArtifactMeta, TrainMeta, read_train_meta
from millis.artifact.validation import LINE_KEY, VALIDATION_FILE, read_validation, selection_files
from millis.common.errors import MillisError
from millis.common.files import file_sha256
from millis.common.readers import Labeled, read_labeled, read_texts, subsample, text_key

Row = tuple[str, str]  # (text, label): a row's identity across files


def source_lines(model_dir: str | Path) -> list[int | None]:
    """The `source_line` of each row of a model dir's validation.jsonl: the row's line in the file it was held out
    of ([] without one)."""
    path = Path(model_dir) / VALIDATION_FILE
    if not path.is_file():
        return []
    return [json.loads(x).get(LINE_KEY) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def trained_rows(meta: TrainMeta, path: Path, val: Labeled | None, lines: list[int | None]) -> frozenset[Row]:
    """The rows a classifier trained on: its file (`path`, holding what it read) as it read it (--limit, --sample,
    --seed), less the rows it held out, by line, when its validation rows are those lines of the file; when it
    validated on another file (a --validation FILE) every row counts as trained on (a row also in that file may
    have been)."""
    cfg = meta.train_config
    rows = subsample(read_labeled(path, meta.data.text_col, meta.data.label_col, int(cfg.get("limit") or 0)),
                     int(cfg.get("sample") or 0), int(cfg.get("seed") or 0))
    if val is not None and lines:
        full = read_labeled(path, meta.data.text_col, meta.data.label_col)
        at = dict(zip(full.lines, zip(full.texts, full.labels)))
        if all(at.get(n) == r for n, r in zip(lines, zip(val.texts, val.labels))):
            held = set(lines)
            return frozenset(r for n, r in zip(rows.lines, zip(rows.texts, rows.labels)) if n not in held)
    return frozenset(zip(rows.texts, rows.labels))


def distill_texts(path: str | Path, text_col: str, limit: int, sample: int, seed: int) -> list[str]:
    """The texts an embedder is distilled on (millis.train.distill, `--task embed`): each text once (a copy in
    training would make its held-out twin a trained row), then a seeded `sample` of them."""
    texts = list(dict.fromkeys(read_texts(path, text_col, limit=limit)))
    if sample and sample < len(texts):
        texts = random.Random(seed).sample(texts, sample)
    return texts


def trained_texts(model_dir: str | Path) -> list[str] | None:
    """The texts a model dir `millis train` / distill / prune wrote trained on ([] for any other dir, None when its
    training file is gone or changed: no telling). An embedder's held-out texts count too: they chose its epoch."""
    meta = read_train_meta(model_dir)
    if meta is None:
        return []
    path = Path(meta.data.path)
    if not meta.data.holds(path):
        return None
    if not meta.data.label_col:  # an embedder's distillation texts
        cfg = meta.train_config
        return distill_texts(path, meta.data.text_col, int(cfg.get("limit") or 0), int(cfg.get("sample") or 0),
                             int(cfg.get("seed") or 0))
    try:
        val = read_validation(model_dir)
    except MillisError:  # an edited validation.jsonl: every row of the file counts
        val = None
    return [t for t, _ in trained_rows(meta, path, val, source_lines(model_dir) if val is not None else [])]


def related_dirs(model_dir: str, model) -> list[str]:
    """The model's directory and every one it was built from that is still a directory: an artifact's source and
    its student (`optimize --compress`), and the source of each millis-trained one (a student's teacher...)."""
    meta = model.meta
    found = [model_dir, meta.source.path] + ([meta.compressed.model] if getattr(meta, "compressed", None) else [])
    out: dict[str, str] = {}
    while found:
        d = found.pop(0)
        if not d or not Path(d).is_dir() or (key := str(Path(d).resolve())) in out:
            continue
        out[key] = d
        trained = read_train_meta(d)
        if trained is not None:
            found.append(trained.source.spec)  # as typed: found when it was given absolute or from here
    return list(out.values())


@dataclass
class Seen:
    """What a model and the models it was built from saw: texts trained on, rows that chose it."""

    trained: set[str] = field(default_factory=set)
    chosen: set[Row] = field(default_factory=set)
    trained_files: list[str] = field(default_factory=list)   # training files found unchanged
    unknown: list[str] = field(default_factory=list)         # model dirs whose training file is gone or changed
    file_sha256: set[str] = field(default_factory=set)       # sha256 of files whose rows all trained or chose it


def seen_by(model_dir: str, model) -> Seen:
    """Everything `millis eval` checks a file against (see the module doc)."""
    s = Seen()
    for d in related_dirs(model_dir, model):
        texts = trained_texts(d)
        if texts is None:
            s.unknown.append(d)
        else:
            s.trained |= set(texts)
        try:
            val = read_validation(d)
        except MillisError:  # an edited validation.jsonl: not this command's error
            val = None
        if val is not None:
            s.chosen |= set(zip(val.texts, val.labels))
        s.file_sha256 |= {file_sha256(f) for f in selection_files(d)}
    if isinstance(model.meta, ArtifactMeta):
        s.file_sha256 |= set(model.meta.measured.selection_sha256)
        cfg = model.meta.config
        if cfg.get("data") and Path(cfg["data"]).is_file():  # optimize --data: the rows selection judged accuracy on
            try:
                sel = read_labeled(cfg["data"], cfg.get("text_col") or "text", cfg.get("label_col") or "")
                s.chosen |= set(zip(sel.texts, sel.labels))
            except MillisError:  # not readable as labelled rows now: its sha256 still counts
                pass
        student = model.meta.compressed  # its directory gone from the cache: the file it trained on, as recorded
        if student is not None and student.data and not Path(student.model).is_dir():
            if Path(student.data).is_file() and file_sha256(student.data) == student.data_sha256:
                s.trained |= set(read_texts(student.data, cfg.get("text_col") or "text"))  # --compress-data's column
            else:
                s.unknown.append(student.model)
    return s


def trained_file(data_file: str, model_dir: str, model) -> bool:
    """Whether `data_file` is (by its bytes) a file this model, or one it was built from, trained on."""
    for d in related_dirs(model_dir, model):
        meta = read_train_meta(d)
        if meta is not None and meta.data.holds(data_file):
            return True
    student = getattr(model.meta, "compressed", None)
    return bool(student and student.data_sha256 and file_sha256(data_file) == student.data_sha256)


def overlap(texts: tuple[str, ...] | list[str], labels: tuple[str, ...] | None, seen: Seen) -> dict[str, int]:
    """How many of the rows are rows the model trained on or that chose it: exactly (train: the text; selection:
    the text and, given labels, the label) and loosely (text_key)."""
    trained_keys = {text_key(t) for t in seen.trained}
    chosen_texts = {t for t, _ in seen.chosen}
    chosen_keys = {text_key(t) for t in chosen_texts}
    exact_chosen = (sum(r in seen.chosen for r in zip(texts, labels)) if labels is not None
                    else sum(t in chosen_texts for t in texts))
    return {"train_rows": sum(t in seen.trained for t in texts),
            "train_rows_normalized": sum(text_key(t) in trained_keys for t in texts),
            "selection_rows": exact_chosen,
            "selection_rows_normalized": sum(text_key(t) in chosen_keys for t in texts)}

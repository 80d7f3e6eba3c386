"""Compressed candidates for `millis optimize --compress`: distilled and pruned students.

A recipe says how deep the student is and how much of it is pruned afterwards; each recipe is
trained once and cached under the millis cache, keyed by the teacher's weights, the training data
and the recipe, so a second `optimize --compress` (or the benchmark) reuses it. The training data
is the teacher's own (`millis train` records it) unless `--compress-data` names another file:
never the evaluation file. On the teacher's file (recorded, or `--compress-data` holding its bytes, under any
name) the students hold out the teacher's validation rows; on another file they never train on a row selection
judges (such rows are dropped first), and `--compress-data` that is the selection file is refused. No student
trains on a text the fidelity gate judges (an embedder's gate: those texts are dropped first).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from millis.common.config import to_dict
from millis.common.errors import MillisError
from millis.common.readers import Labeled, read_labeled, read_texts, text_key
from millis.encoder.source import SPLADE, ModelSource, check_encoder
from millis.common.files import absolute, cache_dir, file_sha256, hash_files

if TYPE_CHECKING:
    from millis.optimize.judge import Judge, Judged


@dataclass(frozen=True)
class CompressRecipe:
    name: str                # prefix of the candidate's variant names, e.g. "l-half-h50"
    layers: float            # distilled student depth as a share of the teacher's (rounded up); 1 = none
    heads: float = 0.0       # then: share of attention heads pruned away (with a recovery fine-tune)
    ffn: float = 0.0         # then: share of FFN neurons pruned away
    drop_layers: int = 0     # then: whole layers pruned away

    def depth(self, teacher_layers: int) -> int:
        return max(1, math.ceil(round(self.layers * teacher_layers, 6)))

    @property
    def prunes(self) -> bool:
        return bool(self.heads or self.ffn or self.drop_layers)


# Named sets of recipes for `--compress`: a few sizes, each then built as fp32 and int8 variants.
COMPRESS_PRESETS: dict[str, tuple[CompressRecipe, ...]] = {
    "default": (CompressRecipe("l-half", 0.5), CompressRecipe("l-half-h50", 0.5, heads=0.5),
                CompressRecipe("l-third", 0.5, drop_layers=1)),
    "quick": (CompressRecipe("l-half", 0.5),),
}
# The variants built from every compressed model (see millis.optimize.build.variants.CATALOG).
COMPRESS_VARIANTS = ("ort-fp32-fused", "ort-int8-dynamic", "ort-int8-dynamic-pc", "ort-int8-attention")


def recipes_for(preset: str) -> tuple[CompressRecipe, ...]:
    if preset not in COMPRESS_PRESETS:
        raise MillisError(f"unknown --compress preset {preset!r}; available: {', '.join(COMPRESS_PRESETS)}")
    return COMPRESS_PRESETS[preset]


def training_data(src: ModelSource, task: str, compress_data: str, text_col: str) -> tuple[str, str, str]:
    """(file, text column, label column) the students train on: `--compress-data`, else what
    `millis train` recorded for the teacher."""
    from millis.artifact.meta import read_train_meta

    trained = read_train_meta(src.path)
    label_col = trained.data.label_col if trained else ""
    if compress_data and is_teacher_data(src, compress_data):  # the teacher's file elsewhere: read as it was
        return compress_data, trained.data.text_col, label_col
    if compress_data:
        return compress_data, text_col, label_col if task == "classify" else ""
    if trained and Path(trained.data.path).is_file():
        return trained.data.path, trained.data.text_col, label_col
    raise MillisError("--compress trains students and needs training data: pass --compress-data FILE "
                      "(labelled for classify, any texts for embed); the teacher was not trained by "
                      "`millis train`, so its training file is unknown")


# The teacher's hold-out settings a student trained on the teacher's own file repeats: the same rows are held
# out, so no student trains on the validation split that `millis optimize` selects on.
SPLIT_FIELDS = ("seed", "val_fraction", "validation", "limit", "sample")


def is_teacher_data(src: ModelSource, compress_data: str) -> bool:
    """Whether the students train on the teacher's own training file: no `--compress-data`, or one that holds
    the file `millis train` recorded (TrainData.holds: its bytes, under any name)."""
    from millis.artifact.meta import read_train_meta

    if not compress_data:
        return True
    trained = read_train_meta(src.path)
    return trained is not None and trained.data.holds(compress_data)


def teacher_split(src: ModelSource, compress_data: str) -> dict[str, Any]:
    """TrainConfig overrides that reproduce the teacher's validation split ({} when `--compress-data` is
    another file than the teacher's: the students hold out their own rows, see without_judged_rows)."""
    from millis.artifact.meta import read_train_meta

    trained = read_train_meta(src.path) if is_teacher_data(src, compress_data) else None
    cfg = trained.train_config if trained else {}  # a distilled / pruned teacher nests its TrainConfig
    return {k: cfg[k] for k in SPLIT_FIELDS if k in cfg}


def teacher_length(src: ModelSource) -> dict[str, Any]:
    """{"max_length": the length a millis-trained teacher trained at} ({} for another teacher): its students train
    at the length it runs at, not at --max-length's default."""
    from millis.artifact.meta import read_train_meta

    trained = read_train_meta(src.path)
    length = trained.train_config.get("max_length") if trained else None
    return {"max_length": int(length)} if length else {}


def check_same_holdout(teacher: Path, student: Path) -> None:
    """A student must hold out exactly the teacher's validation rows (when both keep them)."""
    from millis.artifact.validation import read_validation

    t, s = read_validation(teacher), read_validation(student)
    if t is not None and s is not None and sorted(zip(t.texts, t.labels)) != sorted(zip(s.texts, s.labels)):
        raise MillisError(f"student {student} held out other validation rows than its teacher {teacher}: "
                          f"it may have trained on rows selection judges")


def check_not_judged(compress_data: str, src: ModelSource, selection: Labeled | None,
                     judged_files: tuple[str, ...] = ()) -> None:
    """Refuse `--compress-data` that is (by its bytes) a file whose rows judge the students: the selection rows'
    file, the teacher's kept validation rows, or any of `judged_files` (--data, --sample-texts)."""
    from millis.artifact.validation import selection_files

    if not compress_data or not Path(compress_data).is_file():
        return
    files = [Path(f) for f in judged_files if f] + selection_files(src.path)
    files += [Path(selection.path)] if selection is not None and Path(selection.path).is_file() else []
    mine = file_sha256(compress_data)
    for f in files:
        if f.is_file() and file_sha256(f) == mine:
            raise MillisError(f"--compress-data {compress_data} is {f} (the same bytes), whose rows judge the "
                              f"variants: students trained on it would be judged on rows they learnt; give "
                              f"another file, or leave --compress-data out (the teacher's training file)")


def without_judged_rows(data_file: str, text_col: str, label_col: str, task: str, selection: Labeled | None,
                        fidelity: list[str] | tuple[str, ...], progress: Callable[[str], None]) -> tuple[str, str]:
    """(file, label column) the students train on, from `data_file` (labelled for classify, texts for embed): the
    file itself, or a copy (JSONL, in the millis cache) without the rows whose text is, ignoring spacing and case
    (text_key), among the `selection` rows or the `fidelity` gate's texts (a student trained on them would be
    judged on rows it learnt)."""
    judged = {text_key(t) for t in [*(selection.texts if selection is not None else ()), *fidelity]}
    if not judged:
        return data_file, label_col
    if task == "classify":
        rows = read_labeled(data_file, text_col, label_col)
        label_col = rows.label_col
        recs = [{rows.text_col: t, label_col: y} for t, y in zip(rows.texts, rows.labels)]
    else:
        recs = [{text_col: t} for t in read_texts(data_file, text_col)]
    keep = [r for r in recs if text_key(r[text_col]) not in judged]
    if len(keep) == len(recs):
        return data_file, label_col
    if not keep:
        raise MillisError(f"--compress-data {data_file}: every row is one selection or the fidelity gate judges; "
                          f"students need rows of their own")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
    out = cache_dir() / "compressed" / f"data-{hashlib.sha256(text.encode()).hexdigest()[:16]}" / \
        f"{Path(data_file).stem}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    what = [f"the rows selection judges ({selection.path})"] if selection is not None else []
    what = " and ".join(what + (["the fidelity gate's texts"] if fidelity else []))
    progress(f"compress: dropped {len(recs) - len(keep)} of the {len(recs)} rows of {data_file}: they are among "
             f"{what}; the students train on the other {len(keep)}")
    return str(out), label_col


def cache_key(kind: str, teacher_sha: str, data_file: str, cfg: Any) -> str:
    """Identifies a trained student: what it was trained from, on what, and how (paths excluded)."""
    d = to_dict(cfg)
    d["train"] = {**d["train"], "out": "", "source": "", "data": "", "threads": 0}  # threads: not the result
    blob = json.dumps({"kind": kind, "teacher": teacher_sha, "data": hash_files([Path(data_file)]), "cfg": d},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(kind: str, teacher: ModelSource, data_file: str, cfg: Any, build: Callable[[Any], Path],
           progress: Callable[[str], None] = lambda msg: None) -> Path:
    """The cached output of `build(cfg with out set)` for this teacher, data and recipe; one whose files no
    longer match their recorded sha256 (an edited validation.jsonl...) is built again."""
    from millis.artifact.store import verified_train_meta

    out = cache_dir() / "compressed" / f"{kind}-{cache_key(kind, teacher.sha256, data_file, cfg)}"
    try:
        reuse = verified_train_meta(out) is not None
    except MillisError as e:
        progress(f"compress: rebuilding the cached student: {e}")
        reuse = False
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)  # the cache's own directory, whatever is left of it
        build(replace(cfg, train=replace(cfg.train, out=str(out))))
    return out


def candidates(src: ModelSource, task: str, preset: str, compress_data: str, text_col: str,
               progress: Callable[[str], None], selection: Labeled | None = None, fidelity: tuple[str, ...] = (),
               judged_files: tuple[str, ...] = ()) -> list[tuple[CompressRecipe, Path]]:
    """Train (or reuse) every recipe of `preset` for teacher `src`; [(recipe, model dir)]. `selection`: the
    labelled rows selection judges, `fidelity`: the fidelity gate's texts, which no student trains on;
    `judged_files`: the files they came from (--data, --sample-texts), which --compress-data must not be."""
    from millis.train.distill import DistillConfig, distill
    from millis.train.prune import PRUNE_PRESETS, PruneConfig, prune
    from millis.encoder.source import resolve
    from millis.train.classify import train_config

    check_encoder(src, "--compress")
    if src.pooling.mode == SPLADE:
        raise MillisError(f"--compress: {src.spec} is a SPLADE model, and its students (distilled on pooled hidden "
                          f"states) would drop its masked-LM head: run optimize without --compress")
    check_not_judged(compress_data, src, selection, judged_files)
    data, tcol, lcol = training_data(src, task, compress_data, text_col)
    own_data = is_teacher_data(src, compress_data)  # then the teacher's split holds the selection rows out
    if task != "classify" or not own_data:  # (a classifier's own file: dropping rows would move that split)
        data, lcol = without_judged_rows(data, tcol, lcol, task, None if own_data else selection, fidelity, progress)
    split = {**teacher_split(src, compress_data), **teacher_length(src)}
    out = []
    for r in recipes_for(preset):
        if r.prunes and task != "classify":
            progress(f"compress: skipping {r.name}: pruning needs a classifier")
            continue
        model = src
        if r.layers < 1:
            n = r.depth(src.num_layers)
            if n >= src.num_layers:
                progress(f"compress: skipping {r.name}: {n} layers is not fewer than the teacher's")
                continue
            dcfg = DistillConfig(train=train_config(str(src.path), data, text_col=tcol, label_col=lcol, **split),
                                 layers=n, task="embed" if task == "embed" else "")
            lines = training_lines(r.name, progress)
            model = resolve(str(cached("distill", src, data, dcfg, lambda c: distill(c, lines), progress)))
        if r.drop_layers >= model.num_layers:
            progress(f"compress: skipping {r.name}: cannot drop {r.drop_layers} of {model.num_layers} layers")
            continue
        if r.prunes:
            pcfg = PruneConfig(train=train_config(str(model.path), data, text_col=tcol, label_col=lcol,
                                                  **{**PRUNE_PRESETS["default"], **split}),
                               heads=r.heads, ffn=r.ffn, layers=r.drop_layers)
            lines = training_lines(r.name, progress)
            model = resolve(str(cached("prune", model, data, pcfg, lambda c: prune(c, lines), progress)))
        if own_data:
            check_same_holdout(src.path, model.path)
        out.append((r, model.path))
    return out


def training_lines(name: str, progress: Callable[[str], None]):
    """Training events -> optimize's progress: a line per 5% of an epoch (loss, rate, ETA) and per epoch."""
    from millis.train.step_log import StepLog

    steps, total = StepLog(), [1]

    def on(event: str, f: dict[str, Any]) -> None:
        if event == "start":
            progress(f"compress {name}: {f.get('what', 'training')} on {f['rows']} rows")
            total[0] = f.get("steps_per_epoch", 1)
            steps.restart()
        elif event == "step" and (line := steps.line(f, total[0])):
            progress(f"compress {name}: {line}")
        elif event == "plan" and (said := {k: v for k, v in f.items() if k in ("warning:", "note:")}):
            progress(f"compress {name}: " + ", ".join(f"{k} {v}" for k, v in said.items()))
        elif event == "epoch":
            steps.restart()
            score = next((k for k in ("val_accuracy", "val_cosine") if k in f), None)
            progress(f"compress {name}: epoch {f['epoch']}, loss {f['train_loss']:.4f}"
                     + (f", {score} {f[score]:.4f}" if score else "") + f", {f['seconds']:.0f} s")
    return on


def judge_compressed(task: str, preset: str, compress_data: str, text_col: str, src: ModelSource, work: Path,
                     calibration, judge: Judge, progress: Callable[[str], None],
                     selection: Labeled | None = None, fidelity: tuple[str, ...] | None = None,
                     judged_files: tuple[str, ...] = ()) -> list[Judged]:
    """Every compressed candidate's variants (the students of `preset`), each built from its student and
    judged by `judge` like the rest (accuracy on the `selection` rows when given, which no student trains
    on, else fidelity to the fp32 teacher on the `fidelity` texts, which no student trains on either; None:
    the texts of the JudgeContext `judge` is bound to)."""
    from millis.encoder.source import resolve
    from millis.artifact.meta import read_train_meta
    from millis.optimize.build.variants import CATALOG, Builder

    if fidelity is None:
        fidelity = tuple(getattr(getattr(judge, "keywords", {}).get("ctx"), "texts", None) or ())
    out = []
    data = training_data(src, task, compress_data, text_col)[0]  # the file the students learn from, as given
    for r, path in candidates(src, task, preset, compress_data, text_col, progress, selection, fidelity,
                              judged_files):
        csrc = resolve(str(path))
        trained = read_train_meta(path)
        desc = {"recipe": to_dict(r), "model": str(path), "sha256": csrc.sha256, "layers": csrc.num_layers,
                "heads": csrc.num_heads, "intermediate": _intermediate(path),
                "val_score": trained.val_score if trained else None, "train_s": trained.train_s if trained else None,
                "data": absolute(data), "data_sha256": file_sha256(data)}
        builder = Builder(csrc, task, work / "compressed" / r.name, calibration)
        for name in COMPRESS_VARIANTS:
            v = CATALOG[name]
            out.append(judge(replace(v, name=f"{r.name}+{v.name}", note=f"{r.name} ({csrc.num_layers} layers, "
                                                                          f"{csrc.num_heads} heads): {v.note}"),
                             builder=builder, compressed=desc))
    return out


def _intermediate(path: Path) -> int:
    c = json.loads((path / "config.json").read_text())
    return int(c.get("intermediate_size", c.get("hidden_dim", 0)))

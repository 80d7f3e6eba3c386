"""`millis eval`: task accuracy of a model or artifact on labelled data.

classify: accuracy, macro-F1 and a per-class report (precision, recall, F1, support).
embed:    agreement with the fp32 reference on the file's texts: cosine (min / mean) and
          nearest-neighbour retrieval agreement (does each text find the same neighbour?).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from millis.common.config import check_at_least, flag
from millis.common.errors import MillisError
from millis.common.files import file_sha256
from millis.common.numeric import unit_rows
from millis.common.readers import Labeled, read_labeled
from millis.common.readers import read_texts


NO_DATA = "millis eval needs --data FILE (labelled data) or --text FILE (a decoder's perplexity on a text)"


@dataclass(frozen=True)
class EvalConfig:
    model: str = flag(help="artifact dir, model dir from `millis train`, or a source spec")
    # not required: `millis eval MODEL --text FILE` (a decoder's perplexity) has no --data
    data: str = flag("", "labelled CSV / TSV / JSONL (embed: texts only are enough)", scoped=True)
    text_col: str = flag("text", "text column of --data")
    label_col: str = flag("", "label column of --data (default: the column `millis train` used, else "
                              "label/category/...)")
    limit: int = flag(0, "first N rows only (0 = all)")
    threads: int = flag(0, "intra-op threads (0 = all cores)")

    def __post_init__(self) -> None:
        check_at_least(self, 0, "limit", "threads")
        if not self.data:
            raise MillisError(NO_DATA)


def classification_metrics(y_true: list[str], y_pred: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in y_true or y_pred, and per-class figures."""
    if len(y_true) != len(y_pred) or not y_true:
        raise MillisError(f"need equal, non-empty label lists (got {len(y_true)} and {len(y_pred)})")
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    per_class = {}
    for c in sorted(set(y_true) | set(y_pred)):
        tp = int(((t == c) & (p == c)).sum())
        n_pred, support = int((p == c).sum()), int((t == c).sum())
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {"precision": prec, "recall": rec, "f1": f1, "support": support}
    return {"accuracy": float((t == p).mean()), "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])),
            "n": len(y_true), "per_class": per_class}


def embedding_agreement(ref: np.ndarray, out: np.ndarray, k: int = 10) -> dict[str, float]:
    """ref/out: (N, D). Cosine per row, and how often each row's nearest neighbour (and top-k) agree."""
    if ref.shape != out.shape:
        raise MillisError(f"embedding shapes differ: {ref.shape} vs {out.shape}")
    bad = ~np.isfinite(out).all(1)  # NaN / Inf rows: a cosine of -1, zero vectors in the neighbour search
    rn, on = unit_rows(ref), unit_rows(np.where(bad[:, None], 0.0, out))
    cos = np.where(bad, -1.0, (rn * on).sum(1))  # row_cosines(ref, out), reusing the unit rows for the search
    res = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "n": int(len(ref)),
           "nonfinite_rows": int(bad.sum())}
    if len(ref) < 2:
        return res
    k = min(k, len(ref) - 1)
    s_ref, s_out = rn @ rn.T, on @ on.T
    np.fill_diagonal(s_ref, -np.inf)
    np.fill_diagonal(s_out, -np.inf)
    res["nn_agreement"] = float((s_ref.argmax(1) == s_out.argmax(1)).mean())
    top_ref = np.argsort(-s_ref, axis=1)[:, :k]
    top_out = np.argsort(-s_out, axis=1)[:, :k]
    res[f"top{k}_overlap"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_out)]))
    return res


def argmax_labels(logits: np.ndarray, id2label: dict[int, str]) -> list[str]:
    """(N, C) logits -> the N predicted label names."""
    return [id2label.get(int(i), str(int(i))) for i in logits.argmax(-1)]


def check_labels(data: Labeled, id2label: dict[int, str]) -> None:
    """Every label in the file must be one the model can predict."""
    known = set(id2label.values())
    unknown = sorted(set(data.labels) - known)
    if unknown:
        raise MillisError(f"{data.path} has labels the model does not know: {unknown[:8]}"
                          f"{' ...' if len(unknown) > 8 else ''}; model labels: {sorted(known)[:8]}...")


def _label_col(cfg: EvalConfig, model) -> str:
    """The label column: as given, else the one the model was trained on (an artifact remembers its
    optimize config and its source, which may be a `millis train` directory)."""
    if cfg.label_col:
        return cfg.label_col
    from millis.artifact.meta import ArtifactMeta, read_train_meta

    if isinstance(model.meta, ArtifactMeta) and model.meta.label_col:
        return model.meta.label_col
    for d in (cfg.model, model.meta.source.path):
        meta = read_train_meta(d)
        if meta is not None:
            return meta.data.label_col
    return ""


def seen_by_selection(data_file: str, model_dir: str, model) -> bool:
    """Whether `data_file` holds rows that chose this model, by the sha256 of its bytes: an artifact's selection
    data (recorded in millis.json), or a trained model's validation rows. Its accuracy there is no test score."""
    from millis.artifact.meta import ArtifactMeta
    from millis.artifact.validation import selection_files

    seen = set(model.meta.measured.selection_sha256) if isinstance(model.meta, ArtifactMeta) else set()
    seen |= {file_sha256(f) for f in selection_files(model_dir)}
    return file_sha256(data_file) in seen


def model_dirs(model_dir: str, model) -> list[str]:
    """The model's directory and the one it was built from, those that are directories (a source spec is not)."""
    return [d for d in dict.fromkeys((model_dir, model.meta.source.path)) if d and Path(d).is_dir()]


def selection_rows(data: Labeled, model_dir: str, model) -> int:
    """How many rows of `data` are, by (text, label), validation rows that chose this model or the model it was
    built from: a student keeps its teacher's --validation rows under another sha256, a path given relative to
    another directory is not found, a re-saved copy has other bytes; the rows are the same."""
    from millis.artifact.meta import ArtifactMeta
    from millis.artifact.validation import read_validation

    chosen: set[tuple[str, str]] = set()
    for d in model_dirs(model_dir, model):
        try:
            val = read_validation(d)
        except MillisError:  # an edited validation.jsonl: not this command's error
            val = None
        if val is not None:
            chosen |= set(zip(val.texts, val.labels))
    cfg = model.meta.config if isinstance(model.meta, ArtifactMeta) else {}
    if cfg.get("data") and Path(cfg["data"]).is_file():  # optimize --data: the rows selection judged accuracy on
        try:
            sel = read_labeled(cfg["data"], cfg.get("text_col") or "text", cfg.get("label_col") or "")
            chosen |= set(zip(sel.texts, sel.labels))
        except MillisError:  # not readable as labelled rows now: its sha256 still counts (seen_by_selection)
            pass
    return sum(r in chosen for r in zip(data.texts, data.labels))


def trained_on(data_file: str, model_dir: str, model) -> bool:
    """Whether `data_file` is (by sha256) the file this model, or the model it was built from, trained on."""
    from millis.artifact.meta import read_train_meta

    for d in model_dirs(model_dir, model):
        meta = read_train_meta(d)
        if meta is not None and meta.data.holds(data_file):
            return True
    return False


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.data`; return a JSON-ready dict (see module doc)."""
    from millis.artifact.model import open_model

    model = open_model(cfg.model, threads=cfg.threads)
    res: dict[str, Any] = {"model": cfg.model, "data": cfg.data, "task": model.task, "variant": model.variant}
    if model.task == "classify":
        data = read_labeled(cfg.data, cfg.text_col, _label_col(cfg, model), cfg.limit)
        check_labels(data, model.id2label)
        t0 = time.perf_counter()
        pred = argmax_labels(model.run(list(data.texts)).outputs, model.id2label)
        res["seconds"] = time.perf_counter() - t0
        res.update(classification_metrics(list(data.labels), pred))
        res["label_col"] = data.label_col
        res["selection_rows"] = selection_rows(data, cfg.model, model)
        res["seen_by_selection"] = seen_by_selection(cfg.data, cfg.model, model) or res["selection_rows"] > 0
        res["trained_on"] = trained_on(cfg.data, cfg.model, model)
        return res
    texts = read_texts(cfg.data, cfg.text_col, cfg.limit)
    ref_spec = model.meta.source.path if model.variant != "torch-fp32" else None
    t0 = time.perf_counter()
    out = model.run(texts).outputs
    res["seconds"] = time.perf_counter() - t0
    if ref_spec is None:
        ref = out  # the model is the fp32 reference itself
    else:
        if not Path(ref_spec).is_dir():
            raise MillisError(f"the artifact's fp32 source {ref_spec} is gone; agreement needs it")
        reference = open_model(ref_spec, task="embed", threads=cfg.threads, max_length=model.max_length)
        ref = reference.run(texts).outputs
    res.update(embedding_agreement(ref, out))
    res["seen_by_selection"] = seen_by_selection(cfg.data, cfg.model, model)
    res["trained_on"] = trained_on(cfg.data, cfg.model, model)
    return res

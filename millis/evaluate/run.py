"""`millis eval`: task accuracy of a model or artifact on labelled data.

classify: accuracy, macro-F1 and a per-class report (precision, recall, F1, support).
embed:    agreement with the fp32 reference on the file's texts: cosine (min / mean) and
          nearest-neighbour retrieval agreement (does each text find the same neighbour?); a model that is
          its own reference has nothing to agree with. With labels: how often each text's nearest other
          text has its label (leave-one-out nearest-neighbour accuracy).
Texts are cut to the model's max length (the one it was trained or built at; the result counts the texts cut).
The result says how many rows the model, or a model it was built from, trained on or was chosen by
(millis.evaluate.seen), and `warnings` says what makes the figures no test score. A classifier's per-row
predictions can also be written as JSON Lines (`millis eval --predictions FILE`: millis.evaluate.predictions).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from millis.common.config import check_at_least, flag
from millis.common.errors import MillisError
from millis.common.files import file_sha256
from millis.common.numeric import unit_rows
from millis.common.readers import LABEL_COLUMNS, Labeled, label_order, label_text, read_labeled, read_texts


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
    max_length: int = flag(0, "cut texts to this many tokens (0 = the length the model was trained or built at)",
                           scoped=True)

    def __post_init__(self) -> None:
        check_at_least(self, 0, "limit", "threads", "max_length")
        if not self.data:
            raise MillisError(NO_DATA)


def classification_metrics(y_true: list[str], y_pred: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in y_true or y_pred, and per-class figures."""
    if len(y_true) != len(y_pred) or not y_true:
        raise MillisError(f"need equal, non-empty label lists (got {len(y_true)} and {len(y_pred)})")
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    per_class = {}
    for c in label_order(set(y_true) | set(y_pred)):  # the classes' own order: 2 before 10
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


def neighbour_label_accuracy(vectors: np.ndarray, labels: tuple[str, ...]) -> float | None:
    """Leave-one-out nearest-neighbour accuracy: the share of rows whose nearest other row (cosine) has their label
    (None under two rows). A row that is not finite has no neighbour: it counts as wrong."""
    if len(labels) < 2:
        return None
    bad = ~np.isfinite(vectors).all(1)
    u = unit_rows(np.where(bad[:, None], 0.0, vectors))
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    y = np.asarray(labels, dtype=object)
    return float(np.mean((y[s.argmax(1)] == y) & ~bad))


def texts_with_labels(cfg: EvalConfig, model) -> Labeled | None:
    """An embed file's labelled rows: --label-col's, else a usual label column's (label, category...) when the file
    has one; None without (a text file, or a CSV of texts)."""
    cols = [cfg.label_col] if cfg.label_col else [_label_col(cfg, model)] + list(LABEL_COLUMNS)
    for col in dict.fromkeys(c for c in cols if c):
        try:
            return read_labeled(cfg.data, cfg.text_col, col, cfg.limit)
        except MillisError:
            if cfg.label_col:
                raise
    return None


def leak_warnings(res: dict[str, Any], seen, data: str) -> list[str]:
    """What makes the figures no test score, beyond the file being the selection or training file (the CLI says
    those), and the rows that could not be checked."""
    out = []
    n = res["n"]
    exact, loose = res["train_rows"], res["train_rows_normalized"]
    if loose:
        how = f" ({exact} exactly, {loose - exact} more ignoring spacing and case)" if loose > exact else ""
        out.append(f"{loose} of the {n} rows of {data}{how} are rows this model, or a model it was built from, "
                   f"trained on: these figures are not a test score")
    if res["selection_rows_normalized"] > res["selection_rows"]:
        out.append(f"{res['selection_rows_normalized']} of the {n} rows of {data} are, ignoring spacing and case, "
                   f"rows that selected this model ({res['selection_rows']} exactly)")
    for d in seen.unknown:
        out.append(f"cannot tell which rows {d} trained on: its training file is gone or changed")
    if res["truncated"]:
        out.append(f"{res['truncated']} of the {n} texts were cut to {res['max_length']} tokens, the length the model "
                   f"runs at (--max-length)")
    return out


def stderr_lines(line: str) -> None:
    print(line, file=sys.stderr)


def evaluate(cfg: EvalConfig, say: Callable[[str], None] = stderr_lines, predictions: str = "") -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.data`; return a JSON-ready dict (see module doc). `say` gets the warning and
    note lines (`warning: ...`), which the result also lists (`warnings`). `predictions`: a classifier's per-row
    predictions are also written to that file (millis.evaluate.predictions), last, once all else succeeded; the
    result names it (`predictions`)."""
    from millis.artifact.model import open_model
    from millis.evaluate.seen import overlap, seen_by, trained_file

    model = open_model(cfg.model, threads=cfg.threads, max_length=cfg.max_length)
    if cfg.max_length and model.max_length != cfg.max_length:  # an artifact runs at the length it was built at
        raise MillisError(f"--max-length {cfg.max_length}: {cfg.model} is an artifact built for {model.max_length} "
                          f"tokens; leave --max-length out")
    if predictions and model.task != "classify":
        raise MillisError(f"--predictions: {cfg.model} is an {model.task} model; per-row predictions are a "
                          f"classifier's (leave --predictions out)")
    res: dict[str, Any] = {"model": cfg.model, "data": cfg.data, "task": model.task, "variant": model.variant,
                           "max_length": model.max_length}
    seen = seen_by(cfg.model, model)
    if model.task == "classify":
        data = read_labeled(cfg.data, cfg.text_col, _label_col(cfg, model), cfg.limit)
        # the model's labels by the files' one rule: one trained before it on "1.0" still reads a file's 1.0
        id2label = {k: label_text(v) for k, v in model.id2label.items()}
        check_labels(data, id2label)
        t0 = time.perf_counter()
        ran = model.run(list(data.texts))
        res["seconds"] = time.perf_counter() - t0
        predicted = argmax_labels(ran.outputs, id2label)
        res.update(classification_metrics(list(data.labels), predicted))
        res["label_col"] = data.label_col
        res.update(overlap(data.texts, data.labels, seen))
    else:
        labeled = texts_with_labels(cfg, model)
        texts = list(labeled.texts) if labeled is not None else read_texts(cfg.data, cfg.text_col, cfg.limit)
        t0 = time.perf_counter()
        ran = model.run(texts)
        res["seconds"] = time.perf_counter() - t0
        res.update(embed_figures(cfg, model, texts, ran.outputs, say))
        if labeled is not None:
            res["label_col"] = labeled.label_col
            res["nn_label_accuracy"] = neighbour_label_accuracy(ran.outputs, labeled.labels)
            if res["nn_label_accuracy"] is not None:
                say(f"note: nearest-neighbour label accuracy (leave-one-out, {labeled.label_col!r}) "
                    f"{100 * res['nn_label_accuracy']:.2f}% over {len(texts)} rows")
        res.update(overlap(texts, None, seen))
    res["truncated"] = int(sum(ran.truncated))
    res["seen_by_selection"] = (file_sha256(cfg.data) in seen.file_sha256 or res["selection_rows"] > 0
                                or res["selection_rows_normalized"] > 0)
    res["trained_on"] = trained_file(cfg.data, cfg.model, model)
    res["warnings"] = leak_warnings(res, seen, cfg.data)
    for w in res["warnings"]:
        say(f"warning: {w}")
    if predictions:  # last: an eval that fails writes no file
        from millis.evaluate.predictions import prediction_rows, write_predictions

        write_predictions(predictions, prediction_rows(data, ran.outputs, predicted, ran.truncated,
                                                       model.problem_type))
        res["predictions"] = predictions
    return res


def embed_figures(cfg: EvalConfig, model, texts: list[str], out: np.ndarray, say: Callable[[str], None]) -> dict:
    """Agreement with the fp32 source, or, for the fp32 model itself, `reference: "self"` and no figures (its
    output agrees with itself by construction: a 1.0 would be no measurement)."""
    from millis.artifact.model import open_model

    ref_spec = model.meta.source.path if model.variant != "torch-fp32" else None
    if ref_spec is None:
        say("note: the model is its own fp32 reference: there is nothing to compare its embeddings with (`millis "
            "eval` on an artifact of `millis optimize` measures its agreement with fp32)")
        return {"n": len(texts), "reference": "self", "nonfinite_rows": int((~np.isfinite(out).all(1)).sum())}
    if not Path(ref_spec).is_dir():
        raise MillisError(f"the artifact's fp32 source {ref_spec} is gone; agreement needs it")
    reference = open_model(ref_spec, task="embed", threads=cfg.threads, max_length=model.max_length,
                           pooling=model.meta.source.pooling.mode)  # (a folder may declare none: optimize --pooling)
    return {**embedding_agreement(reference.run(texts).outputs, out), "reference": ref_spec}

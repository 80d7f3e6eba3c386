"""`millis eval --predictions FILE`: a classifier's prediction for each evaluated row, as JSON Lines.

One object per row of --data that the evaluation scored, in the file's order (all its rows, or its first --limit:
the eval skips none, so the file has as many lines as the printed row count):
  row        the row's index among the data file's rows (0 = the first after any header)
  line       the row's line in the file (a CSV row whose quoted text spans lines: its last), as errors cite it
  text       the text as evaluated (stripped, as the metrics read it; before any cut to --max-length)
  label      the gold label, as the per-class report names it
  predicted  the predicted label (the argmax of the logits, as the accuracy counts it)
  score      the predicted label's score: its softmax probability (a sigmoid for multi-label and one-logit models,
             as `millis predict` gives it); null where the model's output is not finite
  correct    predicted == label (their mean is the reported accuracy)
  truncated  the text was cut to the model's max length
The file is written whole through a temporary file beside it and os.replace: an eval that fails leaves no partial
file (and an older file of that name as it was).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from millis.common.files import replace_text
from millis.common.numeric import label_scores
from millis.common.readers import Labeled


def prediction_rows(data: Labeled, logits: np.ndarray, predicted: list[str], truncated: list[bool],
                    problem_type: str = "") -> list[dict[str, Any]]:
    """One record per row of `data` (see the module doc); `predicted` is the label list the metrics scored."""
    if not len(data) == len(logits) == len(predicted) == len(truncated):
        raise ValueError(f"{len(data)} rows, {len(logits)} outputs, {len(predicted)} predictions, "
                         f"{len(truncated)} truncation flags")  # a programming error
    scores = label_scores(logits, problem_type)
    top = np.asarray(logits).argmax(-1)
    rows = []
    for i, (text, gold, pred) in enumerate(zip(data.texts, data.labels, predicted)):
        s = float(scores[i, int(top[i])])
        rows.append({"row": i, "line": data.lines[i], "text": text, "label": gold, "predicted": pred,
                     "score": s if math.isfinite(s) else None, "correct": gold == pred,
                     "truncated": bool(truncated[i])})
    return rows


def write_predictions(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as JSON Lines at `path`, atomically (millis.common.files.replace_text)."""
    replace_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

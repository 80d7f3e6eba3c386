"""Reading the `millis.json` of a model directory written by `millis train`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from millis.artifact import store as artifact

TRAIN_FORMAT = "millis-train"


def read_train_meta(model_dir: str | Path) -> dict[str, Any] | None:
    """The training recipe of a directory written by `millis train`, or None for any other model dir."""
    if artifact.format_of(model_dir) != TRAIN_FORMAT:
        return None
    return json.loads((Path(model_dir) / artifact.META).read_text())

"""The texts shipped with millis: default fidelity and calibration texts, and tiny models' vocabulary."""
from __future__ import annotations

from pathlib import Path

from millis.common.readers import read_texts


def sample_texts() -> list[str]:
    return read_texts(Path(__file__).parent.parent / "data" / "sample_texts.txt")

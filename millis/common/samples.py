"""The texts shipped with millis: default fidelity and calibration texts, and tiny models' vocabulary."""
from __future__ import annotations

from pathlib import Path


def sample_texts() -> list[str]:
    p = Path(__file__).parent.parent / "data" / "sample_texts.txt"
    return [t for t in p.read_text(encoding="utf-8").splitlines() if t.strip()]

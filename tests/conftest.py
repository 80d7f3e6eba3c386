"""Shared fixtures: tiny random models built once per session in a private cache."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# A private cache so tests never depend on (or pollute) the user's ~/.cache/millis.
os.environ.setdefault("MILLIS_CACHE", tempfile.mkdtemp(prefix="millis-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    from millis.tiny import FAMILIES, build_tiny

    return {f: build_tiny(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def quick_measure():
    from millis.config import MeasureConfig, Shape

    return MeasureConfig(shapes=(Shape(1, 16), Shape(2, 32)), warmup=1, iters=4, rounds=2)


@pytest.fixture(scope="session")
def classify_artifact(tmp_path_factory, quick_measure) -> Path:
    """One optimized tiny-BERT classifier artifact shared by api / artifact / cli tests."""
    from millis.config import OptimizeConfig, Shape
    from millis.optimize import optimize

    out = tmp_path_factory.mktemp("art") / "tiny-bert"
    cfg = OptimizeConfig(source="tiny:bert", task="classify", out=str(out), target=Shape(1, 16),
                         variants=("ort-fp32-fused", "ort-int8-dynamic"), measure=quick_measure)
    return optimize(cfg)


def reference_outputs(src_dir: Path, task: str, texts: list[str], max_length: int = 128) -> np.ndarray:
    """fp32 HF outputs, one text at a time (no padding at all): the ground truth."""
    import torch

    from millis.sources import inspect_dir
    from millis.tasks import load_task_model
    from millis.text import TextEncoder

    src = inspect_dir(src_dir)
    model = load_task_model(src, task)
    enc = TextEncoder(src_dir, src.input_names, max_length)
    rows = []
    with torch.inference_mode():
        for t in texts:
            f = enc.encode([t], pad_to=len(enc.token_ids([t])[0][0])).feeds
            rows.append(model(*(torch.from_numpy(f[n]) for n in src.input_names)).numpy()[0])
    return np.stack(rows)

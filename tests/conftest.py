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
    from millis.encoder.tiny import FAMILIES, build_tiny

    return {f: build_tiny(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def quick_measure():
    from millis.optimize.config import MeasureConfig
    from millis.common.config import Shape

    return MeasureConfig(shapes=(Shape(1, 16), Shape(2, 32)), warmup=1, iters=4, rounds=2)


@pytest.fixture(scope="session")
def classify_artifact(tmp_path_factory, quick_measure) -> Path:
    """One optimized tiny-BERT classifier artifact shared by api / artifact / cli tests."""
    from millis.optimize.config import OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

    out = tmp_path_factory.mktemp("art") / "tiny-bert"
    cfg = OptimizeConfig(source="tiny:bert", task="classify", out=str(out), target=Shape(1, 16),
                         variants=("ort-fp32-fused", "ort-int8-dynamic"), measure=quick_measure)
    return optimize(cfg)


def reference_outputs(src_dir: Path, task: str, texts: list[str], max_length: int = 128) -> np.ndarray:
    """fp32 HF outputs, one text at a time (no padding at all): the ground truth."""
    import torch

    from millis.encoder.source import inspect_dir
    from millis.encoder.tasks import load_task_model
    from millis.encoder.text import TextEncoder

    src = inspect_dir(src_dir)
    model = load_task_model(src, task)
    enc = TextEncoder(src_dir, src.input_names, max_length)
    rows = []
    with torch.inference_mode():
        for t in texts:
            f = enc.encode([t], pad_to=len(enc.token_ids([t])[0][0])).feeds
            rows.append(model(*(torch.from_numpy(f[n]) for n in src.input_names)).numpy()[0])
    return np.stack(rows)


# Words the tiny tokenizer knows (they occur in millis/data/sample_texts.txt): two separable topics.
BANK = "card transfer account pin atm refund payment withdraw balance deposit statement limit".split()
MARKET = ("shares stock bond yields earnings revenue profit dividend investors markets analysts oil prices "
          "merger").split()
FILLER = "the my is a today again please why how was it and for".split()


def write_topics(path: Path, rows: int, seed: int) -> Path:
    """A labelled CSV of `rows` short texts, half 'bank', half 'market' (words from the sample texts)."""
    import random

    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(rows):
        label, words = ("bank", BANK) if i % 2 == 0 else ("market", MARKET)
        text = rng.sample(words, 3) + rng.sample(FILLER, rng.randint(1, 4))
        rng.shuffle(text)
        lines.append(f"{' '.join(text)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def topics_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("topics")
    return {"train": write_topics(d / "train.csv", 200, seed=1), "test": write_topics(d / "test.csv", 60, seed=2)}


def train_one_thread(cfg):
    """millis.train.classify.train with cfg.threads=1 (two threads on a busy 2-core machine are ~50x slower);
    torch's global thread count is restored afterwards."""
    from dataclasses import replace

    import torch

    from millis.train.classify import train

    before = torch.get_num_threads()
    try:
        return train(replace(cfg, threads=1))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, topics_data, tiny_dirs) -> Path:
    """tiny:bert fine-tuned on the two-topic file (shared by the train / evaluate tests)."""
    from millis.train.classify import train_config

    out = tmp_path_factory.mktemp("trained") / "topics"
    return train_one_thread(train_config("tiny:bert", str(topics_data["train"]), out=str(out), lr=3e-3,
                                         batch_size=16, epochs=4, patience=10))


def shared_models_dir() -> Path:
    """The real trained models (llama2.c stories260K, babyllama): $MILLIS_DATA/../models, else
    <repo>/../shared/models, the convention of the bench scripts' data directory. Never copied in."""
    data = os.environ.get("MILLIS_DATA")
    if data:
        return Path(data).parent / "models"
    return Path(__file__).resolve().parents[1].parent / "shared" / "models"


def shared_model(name: str) -> Path:
    """The directory of one shared model, or skip the test cleanly when it is absent."""
    d = shared_models_dir() / name
    if not d.is_dir():
        pytest.skip(f"{d} is absent (set MILLIS_DATA so that $MILLIS_DATA/../models holds it)")
    return d


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real SmolLM2-135M-Instruct GGUF (`builtin:smollm2`, installed by the Makefile), else skip."""
    from millis.common.errors import MillisError
    from millis.gen.builtin import resolve_model

    try:
        return resolve_model("builtin:smollm2")
    except MillisError as e:
        pytest.skip(str(e))

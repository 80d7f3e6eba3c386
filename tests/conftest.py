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

    # no RSS probes: a fresh process a variant, ~2.5 s each (tests/test_optimize_review.py reads them)
    return MeasureConfig(shapes=(Shape(1, 16), Shape(2, 32)), warmup=1, iters=4, rounds=2, footprint=False)


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
    """fp32 outputs of transformers' own tokenizer and model, one text at a time (no padding at all): the ground
    truth. Nothing of millis is used: AutoTokenizer cuts each text (truncation=True, max_length), the classifier's
    logits come from AutoModelForSequenceClassification, an embedding is AutoModel's last hidden state pooled
    here as the sentence-transformers folder declares it (modules.json: Pooling's mode, Normalize or not)."""
    import inspect

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    src_dir = Path(src_dir)
    tok = AutoTokenizer.from_pretrained(str(src_dir))
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if task == "classify":
        model = AutoModelForSequenceClassification.from_pretrained(str(src_dir), **kw).eval()
    elif task == "embed":
        model = AutoModel.from_pretrained(str(src_dir), **kw).eval()
        mode, normalize = st_pooling(src_dir)
    else:
        raise ValueError(f"reference_outputs: no reference for task {task!r}")
    takes = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
    rows = []
    with torch.inference_mode():
        for t in texts:
            b = tok([t], truncation=True, max_length=max_length, return_tensors="pt")
            out = model(**{k: v for k, v in b.items() if k in takes})
            if task == "classify":
                rows.append(out.logits[0].float().numpy())
                continue
            h, m = out.last_hidden_state[0].float(), b["attention_mask"][0].bool()  # (T, H), (T,)
            if mode == "cls":
                v = h[0]
            elif mode == "max":
                v = h[m].max(0).values
            else:
                v = (h * m[:, None]).sum(0) / m.sum()
            rows.append((v / v.norm() if normalize else v).numpy())
    return np.stack(rows)


def st_pooling(src_dir: Path) -> tuple[str, bool]:
    """(mode, normalize) a sentence-transformers folder declares: its Pooling module's config (cls / mean / max)
    and whether a Normalize module follows."""
    import json

    modules = json.loads((src_dir / "modules.json").read_text())
    pool = next(m for m in modules if m["type"].endswith("Pooling"))
    cfg = json.loads((src_dir / pool["path"] / "config.json").read_text())
    modes = [m for m, key in (("cls", "cls_token"), ("mean", "mean_tokens"), ("max", "max_tokens"))
             if cfg.get(f"pooling_mode_{key}") or cfg.get("pooling_mode") == key]
    assert len(modes) == 1, cfg
    return modes[0], any(m["type"].endswith("Normalize") for m in modules)


FP32_REL = 1e-5  # fp32 paths: of the outputs' scale (max |ref|); they differ from the reference by ~1e-6
INT8_REL = 0.05  # int8 and below: of the reference's range across the texts (the tiny models' int8: up to ~3%)


def assert_varies(ref: np.ndarray, atol: float, labels: bool = False, factor: float = 10) -> None:
    """Guard for a test comparing outputs with `ref` within `atol`: the reference itself must tell its texts
    apart by far more than that (std across the texts > factor * atol: a constant model passes any such
    comparison, a row swap or a wrong text included); with `labels`, its argmax must differ between the texts
    (else every label check passes)."""
    spread = float(ref.std(0).max())
    assert spread > factor * atol, f"the reference varies across the texts by {spread:.3g} only (atol {atol:.3g})"
    if labels:
        assert np.ptp(ref.argmax(1)) > 0, f"every text has the same argmax {ref.argmax(1)[0]}"


def tolerance(ref: np.ndarray, precision: str, labels: bool = False) -> float:
    """The atol a variant of `precision` keeps against the fp32 reference `ref` (texts x outputs): fp32 FP32_REL of
    the outputs' scale, lower precisions INT8_REL of the reference's range (its largest per-output np.ptp);
    checked first to be well under how much the reference varies across the texts (assert_varies)."""
    if precision == "fp32":
        atol = FP32_REL * float(np.abs(ref).max())
    else:
        atol = INT8_REL * float(np.ptp(ref, 0).max())
    assert_varies(ref, atol, labels, factor=10 if precision == "fp32" else 5)
    return atol


def sure(ref: np.ndarray, atol: float) -> np.ndarray:
    """The texts (a bool mask) whose reference label no error within atol can change: its top two logits more
    than 2 atol apart. A label check over them must see more than one label."""
    top = np.sort(ref, 1)
    keep = top[:, -1] - top[:, -2] > 2 * atol
    assert np.ptp(ref.argmax(1)[keep]) > 0, f"the texts' sure labels are all {ref.argmax(1)[keep]}"
    return keep


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
    """tiny:bert fine-tuned on the two-topic file (shared by the train / evaluate tests). lr 1e-2 in batches of 8:
    tiny:bert's weights at initializer_range 0.2 learn the topics in 3 of the 4 epochs (1.0 test accuracy; at
    lr 3e-3 in batches of 16, the 0.02 weights' setting, 0.77 after 4)."""
    from millis.train.classify import train_config

    out = tmp_path_factory.mktemp("trained") / "topics"
    return train_one_thread(train_config("tiny:bert", str(topics_data["train"]), out=str(out), lr=1e-2,
                                         batch_size=8, epochs=4, patience=10))


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


def native_fp32(folder: Path, task: str, tmp_path: Path, threads: int = 2):
    """(source, its 128-token TextEncoder, the native-fp32 variant built from `folder` and opened) for the
    compact-encoder family tests."""
    from millis.encoder.source import resolve
    from millis.encoder.text import TextEncoder
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.judge import open_variant

    src = resolve(str(folder))
    enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
    vdir, _ = Builder(src, task, tmp_path, calibration=lambda: []).build(CATALOG["native-fp32"])
    return src, enc, open_variant(task, threads, src, CATALOG["native-fp32"], vdir)


def compact_cpu_outputs(folder: Path, task: str, pooling, enc, texts: list[str]) -> np.ndarray:
    """The CUDA encoder's torch form on the CPU in fp32 (millis.gpu.encoder), one text a call: (N, out)."""
    import torch

    from millis.gpu.encoder import RunOptions, from_hf

    compact = from_hf(folder, task, pooling, RunOptions(dtype="fp32", fuse="torch", device="cpu"))
    with torch.inference_mode():
        return np.concatenate([compact(*(torch.from_numpy(f) for f in enc.encode([t]).feeds.values())).numpy()
                               for t in texts])


def unrunnable_deberta(tiny_dirs: dict, tmp_path: Path) -> Path:
    """tiny:deberta-v2 with share_att_key false in its config.json: a family the compact encoders run, in a form they
    refuse by name (millis.encoder.deberta)."""
    import json
    import shutil

    d = tmp_path / "deberta-unshared"
    shutil.copytree(tiny_dirs["deberta-v2"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "share_att_key": False}))
    return d


def optimized_native_answers_as_hf(family: str, task: str, tmp_path: Path, tiny_dirs: dict, quick_measure,
                                   texts: list[str]) -> None:
    """`millis optimize` on tiny:<family> with native-fp32 and native-int7-row: both build and are measured (weights
    and the row precision's smoothing calibration stored), and the chosen artifact loads and answers `texts` as
    transformers does (fp32 within 1e-4, int7-row at cosine > 0.98)."""
    import json
    from dataclasses import replace

    import millis
    from millis.common.config import Shape
    from millis.optimize.config import OptimizeConfig
    from millis.optimize.pipeline import optimize

    out = optimize(OptimizeConfig(source=f"tiny:{family}", task=task, out=str(tmp_path / task), target=Shape(1, 16),
                                  variants=("native-fp32", "native-int7-row"),
                                  measure=replace(quick_measure, threads=1, serve_mix=0)))
    report = json.loads((out / "report.json").read_text())
    assert {r["name"] for r in report["variants"] if r["latency"]} >= {"native-fp32", "native-int7-row"}, report
    m = millis.load(out)
    want = reference_outputs(tiny_dirs[family], task, texts)
    got = np.array([p["logits"] for p in m.predict(texts)]) if task == "classify" else m.embed(texts)
    assert got.shape == want.shape
    if m.meta.variant.name == "native-fp32":
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.98, cos


def native_precision_checks(model, feeds: dict, ref: np.ndarray, floor: float, what) -> None:
    """A NativeBert `model` on `feeds` (8 rows, padded) against the torch form's `ref`: cosine >= floor (fp32: within
    1e-5), row 7 alone equal to it in the batch, and the row split equal to the token split."""
    out = model(*feeds.values())
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert out.shape == ref.shape and cos.min() >= floor, (what, cos.min())
    fp32 = model.precision == "fp32"
    if fp32:
        np.testing.assert_allclose(out, ref, atol=1e-5)
    alone = model(*(f[7:8, :int(feeds["attention_mask"][7].sum())] for f in feeds.values()))
    np.testing.assert_allclose(alone, out[7:8], atol=1e-5 if fp32 else 2e-2)
    split = model.lib.bert_token_split(-1)
    try:
        model.lib.bert_token_split(1 << 20)  # the row split
        rows = model(*feeds.values())
        model.lib.bert_token_split(0)        # the token split
        tokens = model(*feeds.values())
    finally:
        model.lib.bert_token_split(split)
    np.testing.assert_allclose(rows, tokens, atol=1e-6)


def saved_variant(base: Path, d: Path, config_cls, seed: int, changes: dict, draw=None):
    """`base`'s folder (its tokenizer) copied to d with a sequence-classification model of config_cls, config.json's
    keys updated by `changes`, random weights from `seed`; draw(name, parameter, cfg), where given, redraws each
    parameter in place (no_grad). Returns (d, model)."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(base, d)
    cfg = {**json.loads((d / "config.json").read_text()), **changes}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config_cls(**cfg)).eval()
    if draw is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                draw(name, p, cfg)
    for f in d.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(d)
    return d, model


def torch_form_on_feeds(folder: Path, texts: list[str]):
    """(feeds of `texts` at 128 tokens, padded; the CUDA encoder's torch form of `folder` on the CPU in fp32, embed
    task; its outputs on the feeds): what the native precision tests compare against."""
    import torch

    from millis.encoder.source import resolve
    from millis.encoder.text import TextEncoder
    from millis.gpu.encoder import RunOptions, from_hf

    src = resolve(str(folder))
    feeds = TextEncoder(src.path, src.input_names, 128, segments=src.segments).encode(texts).feeds
    compact = from_hf(src.path, "embed", src.pooling, RunOptions(dtype="fp32", fuse="torch", device="cpu"))
    with torch.inference_mode():
        return feeds, compact, compact(*(torch.from_numpy(f) for f in feeds.values())).numpy()

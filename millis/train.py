"""`millis train`: fine-tune a sequence classifier on a labelled file; write a loadable HF directory.

AdamW (no decay on biases / LayerNorm), linear warm-up then linear decay, early stopping on
validation accuracy (the best epoch's weights are kept), seeded end to end. Batches group texts of
similar length (shuffled within windows) so little time goes to padding.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from millis import __version__, artifact, hardware
from millis.config import to_dict
from millis.errors import MillisError
from millis.labeled import Labeled, read_labeled
from millis.sources import hash_files, resolve
from millis.text import TextEncoder

TRAIN_FORMAT = "millis-train"


@dataclass(frozen=True)
class TrainConfig:
    source: str                     # local HF dir, builtin:minilm or tiny:<family>
    data: str                       # labelled CSV / TSV / JSONL
    out: str = "models/classifier"
    text_col: str = "text"
    label_col: str = ""             # "" = label, category, intent... whichever the file has
    validation: str = ""            # labelled file; "" = hold out `val_fraction` of `data`, per class
    val_fraction: float = 0.1
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-4                # small encoders (MiniLM) like a higher rate than BERT-base's 2e-5
    weight_decay: float = 0.01
    warmup: float = 0.06            # share of all steps spent warming up
    patience: int = 2               # epochs without a better validation accuracy before stopping
    max_length: int = 128
    seed: int = 0
    limit: int = 0                  # use only the first N training rows
    sample: int = 0                 # use a seeded random sample of N rows (files sorted by label)
    threads: int = 0                # torch intra-op threads; 0 = torch's default

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise MillisError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise MillisError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MillisError(f"--lr must be > 0, got {self.lr}")


# Named presets: overrides applied to a TrainConfig.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {"epochs": 1, "sample": 512, "batch_size": 16},  # CI and smoke runs
}

Progress = Callable[[str, dict[str, Any]], None]  # (event, fields): "start", "step", "epoch", "done"


def split(data: Labeled, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, validation) row indices; a class with one example stays in training."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def subsample(data: Labeled, n: int, seed: int) -> Labeled:
    """A seeded random `n` rows in file order (all rows when n is 0 or not smaller than the file)."""
    if not n or n >= len(data):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data)), n))
    return replace(data, texts=tuple(data.texts[i] for i in keep), labels=tuple(data.labels[i] for i in keep),
                   lines=tuple(data.lines[i] for i in keep))


def length_batches(lengths: list[int], batch: int, rng: random.Random, window: int = 50) -> list[list[int]]:
    """Shuffle, then sort inside windows of `window` batches by length, cut, shuffle batch order."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    out = []
    for s in range(0, len(idx), batch * window):
        chunk = sorted(idx[s:s + batch * window], key=lambda i: lengths[i])
        out += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    rng.shuffle(out)
    return out


def _check_classes(data: Labeled, val: Labeled | None) -> list[str]:
    classes = data.classes
    if len(classes) < 2:
        raise MillisError(f"{data.path} has only one class ({classes[0]!r}) in column {data.label_col!r}: "
                          f"a classifier needs at least two")
    if val is not None:
        unknown = sorted(set(val.labels) - set(classes))
        if unknown:
            raise MillisError(f"validation file {val.path} has labels not in the training data: {unknown[:8]}")
    return classes


def train(cfg: TrainConfig, progress: Progress = lambda event, fields: None) -> Path:
    """Fine-tune `cfg.source` on `cfg.data`; return the output directory (an HF model dir + millis.json)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress is shown instead
    src = resolve(cfg.source)
    data = subsample(read_labeled(cfg.data, cfg.text_col, cfg.label_col, cfg.limit), cfg.sample, cfg.seed)
    val_file = read_labeled(cfg.validation, cfg.text_col, data.label_col) if cfg.validation else None
    classes = _check_classes(data, val_file)
    label2id = {c: i for i, c in enumerate(classes)}
    if val_file is not None:
        tr_idx, val_texts, val_y = list(range(len(data))), list(val_file.texts), [label2id[y] for y in val_file.labels]
    else:
        tr_idx, va_idx = split(data, cfg.val_fraction, cfg.seed)
        val_texts, val_y = [data.texts[i] for i in va_idx], [label2id[data.labels[i]] for i in va_idx]
    if not val_texts:
        raise MillisError(f"{data.path}: too few rows to hold out a validation set; pass --validation FILE")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    max_len = min(cfg.max_length, src.max_length)
    tok = AutoTokenizer.from_pretrained(str(src.path))
    tr_ids = tok([data.texts[i] for i in tr_idx], truncation=True, max_length=max_len)["input_ids"]
    tr_y = [label2id[data.labels[i]] for i in tr_idx]
    va_ids = tok(val_texts, truncation=True, max_length=max_len)["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(
        str(src.path), num_labels=len(classes), id2label=dict(enumerate(classes)), label2id=label2id,
        problem_type="single_label_classification", ignore_mismatched_sizes=True)
    packer = TextEncoder(src.path, ("input_ids", "attention_mask"), max_len)  # pads like inference does

    def tensors(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        # (B, T) with T = the batch's longest row
        return {k: torch.from_numpy(v) for k, v in packer.pack(rows, max(len(r) for r in rows)).items()}

    def accuracy() -> float:
        model.eval()
        order = sorted(range(len(va_ids)), key=lambda i: len(va_ids[i]))
        pred = [0] * len(va_ids)
        with torch.inference_mode():
            for s in range(0, len(order), 64):
                idx = order[s:s + 64]
                logits = model(**tensors([va_ids[i] for i in idx])).logits
                for i, p in zip(idx, logits.argmax(-1).tolist()):
                    pred[i] = p
        model.train()
        return float(np.mean([p == y for p, y in zip(pred, val_y)]))

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
               "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    steps_per_epoch = -(-len(tr_ids) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    progress("start", {"rows": len(tr_ids), "val_rows": len(val_texts), "classes": len(classes),
                       "steps": total, "steps_per_epoch": steps_per_epoch})
    history, best, best_state, bad_epochs, t_start = [], -1.0, None, 0, time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, idx in enumerate(length_batches([len(r) for r in tr_ids], cfg.batch_size, rng), start=1):
            out = model(**tensors([tr_ids[i] for i in idx]), labels=torch.tensor([tr_y[i] for i in idx]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
            loss_sum += out.loss.item() * len(idx)
            progress("step", {"epoch": epoch, "step": step, "loss": out.loss.item(),
                              "rows_per_s": seen / (time.perf_counter() - t0)})
        acc = accuracy()
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "val_accuracy": acc,
               "seconds": time.perf_counter() - t0, "rows_per_s": seen / (time.perf_counter() - t0)}
        history.append(row)
        improved = acc > best
        if improved:
            best, bad_epochs = acc, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        progress("epoch", {**row, "best": best, "improved": improved})
        if bad_epochs >= cfg.patience:
            break
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]

    def fill(tmp: Path) -> dict[str, Any]:
        model.eval().save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        return {"millis_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": {"spec": src.spec, "sha256": src.sha256, "model_type": src.model_type},
                "data": {"path": data.path, "sha256": hash_files([Path(data.path)]), "rows": len(data),
                         "text_col": data.text_col, "label_col": data.label_col,
                         "validation": cfg.validation or f"{cfg.val_fraction:.0%} held out per class"},
                "labels": classes, "best_epoch": best_epoch, "val_accuracy": best, "history": history,
                "train_s": time.perf_counter() - t_start, "hardware": hardware.describe(), "config": to_dict(cfg)}

    out = artifact.write(Path(cfg.out), fill, fmt=TRAIN_FORMAT)
    progress("done", {"out": str(out), "val_accuracy": best, "best_epoch": best_epoch})
    return out


def train_config(source: str, data: str, preset: str = "default", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named preset plus explicit overrides (the CLI's flags)."""
    if preset not in TRAIN_PRESETS:
        raise MillisError(f"unknown training preset {preset!r}; available: {', '.join(TRAIN_PRESETS)}")
    return replace(TrainConfig(source=source, data=data), **{**TRAIN_PRESETS[preset], **overrides})


def read_train_meta(model_dir: str | Path) -> dict[str, Any] | None:
    """The training recipe of a directory written by `millis train`, or None for any other model dir."""
    import json

    if artifact.format_of(model_dir) != TRAIN_FORMAT:
        return None
    return json.loads((Path(model_dir) / artifact.META).read_text())

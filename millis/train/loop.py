"""The training loop shared by `millis train`, `millis distill` and `millis prune`.

`prepare` reads and tokenizes a labelled file (which rows validate: millis.train.holdout); `fit` runs
AdamW with linear warm-up and decay over length-grouped batches, scores every epoch, stops early
(unless --patience is 0) and restores the best epoch's weights; `save` writes the HF directory with its
recipe. What differs between the commands is only the loss of a batch (`LossFn`).

The max length a model trains at is the one it runs at: texts are cut to min(--max-length, the model's positions),
`save` records that length (millis.json's config) and writes it into the saved tokenizer (model_max_length, and a
sentence-transformers folder's max_seq_length), which every later load reads (millis.encoder.source.model_max_length).
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from millis import __version__
from millis.artifact import store as artifact
from millis.artifact.meta import Hardware, TrainMeta, TrainSource
from millis.common.config import to_dict
from millis.common.schema import from_dict
from millis.common.errors import MillisError
from millis.common.readers import Labeled, read_labeled, subsample
from millis.train.holdout import Note, held_out, warn
from millis.encoder.source import ModelSource
from millis.common.files import absolute, hash_files
from millis.encoder.text import TextEncoder

from millis.artifact.validation import VALIDATION_FILE, write_validation

Progress = Callable[[str, dict[str, Any]], None]  # (event, fields): "start", "step", "epoch", "done"
LossFn = Callable[[list[int]], Any]               # training row indices -> scalar loss tensor


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


def check_classes(data: Labeled, val: Labeled | None) -> list[str]:
    classes = data.classes
    if len(classes) < 2:
        raise MillisError(f"{data.path} has only one class ({classes[0]!r}) in column {data.label_col!r}: "
                          f"a classifier needs at least two")
    if val is not None:
        unknown = sorted(set(val.labels) - set(classes))
        if unknown:
            raise MillisError(f"validation file {val.path} has labels not in the training data: {unknown[:8]}")
    return classes


@dataclass
class TaskData:
    """Tokenized training and validation rows of one labelled file."""

    data: Labeled
    classes: list[str]
    tr_ids: list[list[int]]
    tr_y: list[int]
    va_ids: list[list[int]]
    va_y: list[int]
    packer: TextEncoder             # pads exactly like inference does
    max_len: int
    validation: str                 # where the validation rows came from, for millis.json
    val: Labeled | None = None      # the labelled validation rows (kept beside the model: validation.jsonl)
    truncated: dict[str, int] = field(default_factory=dict)  # rows cut to max_len: {"train": n, "validation": m}

    def tensors(self, rows: list[list[int]]) -> dict[str, Any]:
        import torch

        # (B, T) with T = the batch's longest row
        return {k: torch.from_numpy(v) for k, v in self.packer.pack(rows, max(len(r) for r in rows)).items()}


def prepare(cfg, src: ModelSource, classes: list[str] | None = None, prefer: list[str] | None = None,
            progress: Progress | None = None) -> TaskData:
    """Read, split (millis.train.holdout.held_out) and tokenize `cfg.data` (a TrainConfig). `classes` fixes
    the label order (a model that already has labels); otherwise `prefer`'s order when the file's classes
    are among them (a classifier trained further keeps what each row of its head means), else the file's
    sorted classes. Warnings and how many texts were cut go to `progress` ("plan" events) when given."""
    from transformers import AutoTokenizer

    note = warn if progress is None else notes(progress)
    data = subsample(read_labeled(cfg.data, cfg.text_col, cfg.label_col, cfg.limit), cfg.sample, cfg.seed)
    tr_idx, val, validation = held_out(cfg, data, src, note)  # a millis-trained source's validation rows stay out
    found = check_classes(data, val)
    if classes is None and prefer and set(found) <= set(prefer):
        classes = prefer
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise MillisError(f"{data.path} has labels the model does not know: {unknown[:8]}; "
                              f"the model's labels: {classes[:8]}{'...' if len(classes) > 8 else ''}")
    classes = list(classes) if classes is not None else found
    label2id = {c: i for i, c in enumerate(classes)}
    val_texts, val_y = list(val.texts), [label2id[y] for y in val.labels]
    if not val_texts:
        raise MillisError(f"{data.path}: too few rows to hold out a validation set; pass --validation FILE")
    if not tr_idx:
        raise MillisError(f"{data.path}: no training rows are left: every row is a validation row"
                          + (f" ({validation})" if validation else ""))
    max_len = train_length(cfg, src, note)
    tok = AutoTokenizer.from_pretrained(str(src.path))
    tr_ids, tr_cut = tokenize(tok, [data.texts[i] for i in tr_idx], max_len)
    va_ids, va_cut = tokenize(tok, val_texts, max_len)
    cut_note(tr_cut, len(tr_ids), va_cut, len(va_ids), max_len, progress)
    return TaskData(data, classes, tr_ids, [label2id[data.labels[i]] for i in tr_idx], va_ids, val_y,
                    TextEncoder(src.path, ("input_ids", "attention_mask"), max_len), max_len, validation, val,
                    {"train": tr_cut, "validation": va_cut})


def notes(progress: Progress) -> Note:
    """A training command's warnings as "plan" events: the CLI logs them as `warning: ...` lines."""
    return lambda message: progress("plan", {"warning:": message})


def train_length(cfg, src: ModelSource, note: Note) -> int:
    """The max length texts are cut to: --max-length (a TrainConfig's), within the model's positions."""
    if cfg.max_length > src.max_length:
        note(f"--max-length {cfg.max_length} is above the {src.max_length} positions of {src.spec}: texts are cut "
             f"to {src.max_length} tokens (the length recorded and run at)")
    return min(cfg.max_length, src.max_length)


def tokenize(tok, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """(token ids of `texts` cut to `max_len` as the tokenizer cuts, keeping the final special token; how many
    texts were cut)."""
    ids = tok(texts, truncation=True, max_length=max_len)["input_ids"]
    full = tok(texts, verbose=False)["input_ids"]
    return ids, sum(len(a) > len(b) for a, b in zip(full, ids))


def cut_note(tr_cut: int, n_tr: int, va_cut: int, n_va: int, max_len: int, progress: Progress | None) -> None:
    """Say how many texts are cut to the max length, when any are (a "plan" event)."""
    if progress is not None and (tr_cut or va_cut):
        progress("plan", {"note:": f"{tr_cut} of {n_tr} training and {va_cut} of {n_va} validation texts are cut "
                                   f"to {max_len} tokens (--max-length)"})


def predict(model, td: TaskData, ids: list[list[int]], batch: int = 64) -> np.ndarray:
    """Logits (N, C) of `model` (an HF sequence classifier) on token rows, in row order."""
    import torch

    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            logits = model(**td.tensors([ids[i] for i in idx])).logits.float().numpy()
            for i, row in zip(idx, logits):
                out[i] = row
    model.train(was_training)
    return np.stack(out)


def val_accuracy(model, td: TaskData) -> float:
    """Validation accuracy; NaN when any logit is not finite (argmax would read a NaN row as class 0)."""
    logits = predict(model, td, td.va_ids)
    if not np.isfinite(logits).all():
        return float("nan")
    return float(np.mean(logits.argmax(-1) == np.asarray(td.va_y)))


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -1.0
    best_epoch: int = 0
    seconds: float = 0.0


def seed_all(seed: int, threads: int = 0) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def fit(model, cfg, lengths: list[int], loss_of: LossFn, score: Callable[[], float],
        progress: Progress, score_name: str = "val_accuracy", info: dict[str, Any] | None = None) -> FitResult:
    """Train `model` with `loss_of(batch rows)`; `score()` after each epoch (higher is better).
    `cfg` is a TrainConfig (schedule fields). The best epoch's weights are loaded back. `info` is
    added to the "start" event (what is being trained, on how many validation rows)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    steps_per_epoch = -(-len(lengths) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    progress("start", {**(info or {}), "score_name": score_name, "rows": len(lengths), "steps": total,
                       "steps_per_epoch": steps_per_epoch})
    res, best_state, bad_epochs, t_start = FitResult(), None, 0, time.perf_counter()
    diverged: dict[str, Any] | None = None
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, idx in enumerate(length_batches(lengths, cfg.batch_size, rng), start=1):
            loss = loss_of(idx)
            value = loss.item()  # read once a step
            if not math.isfinite(value):  # stop before its gradients make every weight NaN
                diverged = {"epoch": epoch, "step": step, "loss": str(value)}
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
            loss_sum += value * len(idx)
            progress("step", {"epoch": epoch, "step": step, "loss": value,
                              "rows_per_s": seen / (time.perf_counter() - t0)})
        if diverged is not None:  # the best epoch before it (if any) is kept
            progress("diverged", diverged)
            break
        s = score()
        row = {"epoch": epoch, "train_loss": loss_sum / seen, score_name: s,
               "seconds": time.perf_counter() - t0, "rows_per_s": seen / (time.perf_counter() - t0)}
        res.history.append(row)
        improved = math.isfinite(s) and (best_state is None or s > res.best)  # NaN: a diverged epoch
        if improved:
            res.best, res.best_epoch, bad_epochs = s, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        progress("epoch", {**row, "best": res.best, "improved": improved})
        if cfg.patience and bad_epochs >= cfg.patience:  # --patience 0: no early stopping
            break
    if best_state is None:
        scores = ", ".join(str(h[score_name]) for h in res.history) or "none"
        where = (f"; the loss was {diverged['loss']} at epoch {diverged['epoch']} step {diverged['step']}"
                 if diverged else "")
        raise MillisError(f"no epoch gave a finite {score_name} (scores: {scores}{where}): training diverged; "
                          f"try a lower --lr (now {cfg.lr:g})")
    model.load_state_dict(best_state)
    model.eval()
    res.seconds = time.perf_counter() - t_start
    return res


def read_paths(cfg, src: ModelSource) -> tuple[str, ...]:
    """What a training command reads, which its --out must neither be, hold nor lie inside: the source model
    (and distill's other student), the training and validation files. `cfg`: a Train-, Distill- or PruneConfig."""
    t = getattr(cfg, "train", cfg)  # distill and prune nest their TrainConfig
    return (str(src.path), getattr(cfg, "student", ""), t.data, t.validation)


def check_out(cfg, src: ModelSource) -> None:
    """Refuse a bad --out before training (save() checks it again): see millis.artifact.store.check_out."""
    artifact.check_out(getattr(cfg, "train", cfg).out, read_paths(cfg, src))


def save(model, src: ModelSource, cfg, out: Path, res: FitResult, data: dict[str, Any],
         extra: dict[str, Any] | None = None, write_model: Callable[[Path], None] | None = None,
         validation: Labeled | None = None, max_length: int = 0) -> Path:
    """Write `model` (and the source's tokenizer) as an HF directory with its recipe in millis.json.
    `write_model(dir)` replaces `model.save_pretrained` (pruned models add their shapes). `validation`:
    the held-out rows, kept as validation.jsonl (`millis optimize` selects on them by default). `max_length`:
    the length it trained at (TaskData.max_len), written into the tokenizer and the recorded config."""
    from transformers import AutoTokenizer

    def fill(tmp: Path) -> TrainMeta:
        (write_model or (lambda d: model.save_pretrained(str(d))))(tmp)
        AutoTokenizer.from_pretrained(str(src.path)).save_pretrained(str(tmp))
        if max_length:
            pin_length(tmp, max_length)
        if validation is not None:
            write_validation(tmp, validation)
        record = {"millis_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "source": TrainSource(src.spec, src.sha256, src.model_type), "data": data,
                  "best_epoch": res.best_epoch, "history": res.history, "train_s": res.seconds,
                  "hardware": Hardware.this_machine(), "config": recorded_config(cfg, max_length),
                  **(extra or {})}
        return from_dict(TrainMeta, record, f"the training record of {out}", strict=True)  # typed, or fails here

    return artifact.write(Path(out), fill, keep=read_paths(cfg, src))


def recorded_config(cfg, max_length: int = 0) -> dict[str, Any]:
    """`cfg` (a Train-, Distill- or PruneConfig) as millis.json records it: the files it read by absolute
    paths (`millis eval` and `optimize` reopen --validation and the training file from anywhere), and the
    max length it trained at (`max_length`, when given: --max-length within the model's positions)."""
    d = to_dict(cfg)
    for part in (d, d.get("train") or {}):
        for key in ("data", "validation"):
            if part.get(key):
                part[key] = absolute(part[key])
        if max_length and "max_length" in part:
            part["max_length"] = max_length
    return d


def pin_length(model_dir: Path, max_length: int) -> None:
    """Make `max_length` the length `model_dir` runs at (millis.encoder.source.model_max_length reads it): the
    tokenizer's model_max_length, and a sentence-transformers folder's max_seq_length (read first) when it has one."""
    for name, key in (("tokenizer_config.json", "model_max_length"), ("sentence_bert_config.json", "max_seq_length")):
        f = model_dir / name
        if f.is_file():
            d = json.loads(f.read_text())
            d[key] = max_length
            f.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def data_meta(td: TaskData) -> dict[str, Any]:
    d = td.data
    return {"path": absolute(d.path), "sha256": hash_files([Path(d.path)]), "rows": len(d), "text_col": d.text_col,
            "label_col": d.label_col, "validation": td.validation, "validation_file": VALIDATION_FILE,
            "validation_rows": len(td.val), "truncated": td.truncated}

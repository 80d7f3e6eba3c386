"""`millis train`: fine-tune a sequence classifier on a labelled file; write a loadable HF directory.

AdamW (no decay on biases / LayerNorm), linear warm-up then linear decay, early stopping on
validation accuracy (the best epoch's weights are kept), seeded end to end. Batches group texts of
similar length (shuffled within windows) so little time goes to padding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from millis.common.config import check_at_least, flag, preset_of
from millis.common.errors import MillisError
from millis.train.loop import Progress, check_out, data_meta, fit, prepare, save, seed_all, val_accuracy
from millis.encoder.hf import load_hf
from millis.encoder.source import check_encoder, resolve


@dataclass(frozen=True)
class TrainConfig:
    # Every field is a flag of `millis train` / `distill` / `prune`; a flag given (or its MILLIS_* variable)
    # overrides the --preset's value (TRAIN_PRESETS).
    source: str = flag(help="local Hugging Face model dir, builtin:minilm, or tiny:bert...")
    data: str = flag(help="training file: labelled CSV / TSV / JSONL", scoped=True)
    out: str = flag("models/classifier", "model directory to write", scoped=True)
    text_col: str = flag("text", "text column of the data")
    label_col: str = flag("", "label column (default: label, category, intent... whichever the file has)")
    validation: str = flag("", "labelled validation file (default: hold out --val-fraction of the data, per class)")
    val_fraction: float = flag(0.1, "share of the data held out for validation, per class")
    epochs: int = flag(8, "most epochs (early stopping may end sooner)")
    batch_size: int = flag(32, "rows per step")
    # small encoders (MiniLM) like a higher rate than BERT-base's 2e-5
    lr: float = flag(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = flag(0.01, "AdamW weight decay (not on biases / LayerNorm)")
    warmup: float = flag(0.06, "share of all steps spent warming up", scoped=True)
    patience: int = flag(2, "epochs without a better validation score before stopping (0 = never stop early)")
    max_length: int = flag(128, "truncate texts to this many tokens")
    seed: int = flag(0, "seed of the split, the shuffling and the weights")
    limit: int = flag(0, "use only the first N training rows (0 = all)")
    sample: int = flag(0, "use a seeded random sample of N rows (0 = all; files sorted by label)")
    threads: int = flag(0, "torch intra-op threads (0 = torch's default)")

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise MillisError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise MillisError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MillisError(f"--lr must be > 0, got {self.lr}")
        check_at_least(self, 0, "limit", "sample", "patience", "threads", "weight_decay", "warmup")
        if self.warmup >= 1:  # a share of all steps: at 1 or more the rate never reaches --lr
            raise MillisError(f"--warmup is a share of all steps, below 1, got {self.warmup}")


# Named presets (`--preset`): overrides applied to a TrainConfig; the flags given override them in turn.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {"epochs": 1, "sample": 512, "batch_size": 16},  # CI and smoke runs
}


def train(cfg: TrainConfig, progress: Progress = lambda event, fields: None) -> Path:
    """Fine-tune `cfg.source` on `cfg.data`; return the output directory (an HF model dir + millis.json)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress is shown instead
    src = resolve(cfg.source)
    check_encoder(src, "millis train")
    check_out(cfg, src)
    known = [src.id2label[i] for i in sorted(src.id2label)] if src.has_classifier else None
    td = prepare(cfg, src, prefer=known, progress=progress)
    seed_all(cfg.seed, cfg.threads)
    label2id = {c: i for i, c in enumerate(td.classes)}
    model = load_hf(src.path, AutoModelForSequenceClassification,
                    num_labels=len(td.classes), id2label=dict(enumerate(td.classes)), label2id=label2id,
                    problem_type="single_label_classification", ignore_mismatched_sizes=True)
    if known is not None and td.classes != known:
        fresh_head(model)  # other labels: a head of the same size would keep rows that meant other classes

    def loss_of(idx: list[int]):
        return model(**td.tensors([td.tr_ids[i] for i in idx]), labels=torch.tensor([td.tr_y[i] for i in idx])).loss

    res = fit(model, cfg, [len(r) for r in td.tr_ids], loss_of, lambda: val_accuracy(model, td), progress,
              info={"what": f"fine-tuning {src.spec}", "val_rows": len(td.va_ids), "classes": len(td.classes)})
    out = save(model, src, cfg, Path(cfg.out), res, data_meta(td),
               {"labels": td.classes, "val_accuracy": res.best}, validation=td.val, max_length=td.max_len)
    progress("done", {"out": str(out), "val_accuracy": res.best, "best_epoch": res.best_epoch})
    return out


def fresh_head(model) -> None:
    """Draw the task head's weights anew (every Linear outside the encoder), as HF initialises a new head:
    normal(0, initializer_range) weights, zero biases; seeded by seed_all."""
    import torch

    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.startswith(model.base_model_prefix):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


def train_config(source: str, data: str, preset: str = "default", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named preset plus explicit overrides (the CLI's flags)."""
    return replace(TrainConfig(source=source, data=data), **{**preset_of(TRAIN_PRESETS, preset, "training preset"),
                                                             **overrides})



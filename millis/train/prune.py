"""`millis prune`: remove attention heads, FFN neurons and whole layers; recover; write an HF dir.

Importance is measured on the task data before anything is cut:
- heads and FFN neurons: |dL/dm| of a mask m = 1 multiplying each head's context / each neuron's
  activation, summed over `importance_rows` training rows, a seeded sample stratified by class (Michel
  et al. 2019; Molchanov et al. 2019 for neurons); head scores are L2-normalised per layer;
- layers: the validation loss with the layer skipped, greedily, one layer at a time.
The cut is structural (smaller matrices, see millis.encoder.hf) and uniform across layers; then a
short recovery fine-tune distils from the unpruned model (soft + hard loss).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from millis.train.distill import kd_loss
from millis.common.config import flag, preset_of
from millis.common.errors import MillisError
from millis.train.loop import (Progress, TaskData, check_out, data_meta, fit, predict, prepare, save, seed_all,
                               val_accuracy)
from millis.encoder.hf import cut_ffn, cut_heads, cut_layers, encoder_layers, load_hf, masks, num_heads
from millis.encoder.source import check_encoder, resolve
from millis.train.classify import TrainConfig, train_config


@dataclass(frozen=True)
class PruneConfig:
    train: TrainConfig           # source = the model to prune; data, out and the recovery schedule
    heads: float = flag(0.0, "share of attention heads to remove in every layer, in (0, 1)")
    layers: int = flag(0, "whole layers to drop", scoped=True)
    ffn: float = flag(0.0, "share of FFN neurons to remove in every layer, in (0, 1)")
    importance_rows: int = flag(1024, "training rows that score heads and neurons (a seeded sample, "
                                            "stratified by class)")
    # recovery distils from the unpruned model
    temperature: float = flag(2.0, "softmax temperature of the recovery's soft loss", scoped=True)
    soft_weight: float = 1.0
    hard_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise MillisError(f"--{name} is the share to remove and must be in (0, 1), got {v}")
        if self.layers < 0:
            raise MillisError(f"--layers is how many layers to drop and must be >= 0, got {self.layers}")
        if not (self.heads or self.ffn or self.layers):
            raise MillisError("nothing to prune: give --heads, --ffn and/or --layers")
        if self.importance_rows < 1:
            raise MillisError(f"--importance-rows must be >= 1, got {self.importance_rows}")


# Named presets (`--preset`) of the recovery fine-tune: TrainConfig overrides; flags given override them in turn.
PRUNE_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"epochs": 2, "lr": 5e-5},                     # a short recovery
    "quick": {"epochs": 1, "sample": 512, "batch_size": 16},  # CI and smoke runs
}
PRUNED_DIR = "models/pruned"  # where `millis prune` writes by default


def prune_config(model: str, data: str, preset: str = "default", out: str = PRUNED_DIR,
                 train: dict[str, Any] | None = None, **prune: Any) -> PruneConfig:
    """A PruneConfig from a named preset, recovery schedule overrides (`train`) and pruning fields."""
    schedule = preset_of(PRUNE_PRESETS, preset, "pruning preset")
    return PruneConfig(train=train_config(model, data, out=out, **{**schedule, **(train or {})}), **prune)


@dataclass
class Plan:
    """What stays: layer indices, then per kept layer the heads and FFN neurons (None = all)."""

    layers: list[int]
    heads: list[list[int]] | None
    ffn: list[list[int]] | None
    scores: dict[str, Any]


def sample_rows(labels: list[int], n: int, seed: int) -> list[int]:
    """`n` row indices (in row order), seeded and stratified: each class in proportion to its rows, so a file
    sorted by label (Banking77's first 1024 rows hold 9 of its 77 classes) is scored on all of them."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keyed = []  # (place in its class, as a share of the class, jittered; row): the first n spread over classes
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        keyed += [((r + rng.random()) / len(idx), i) for r, i in enumerate(idx)]
    return sorted(i for _, i in sorted(keyed)[:n])


def importance(model, td: TaskData, rows: int, batch: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(head scores (L, H), neuron scores (L, I)) from mask gradients on `rows` training rows (sample_rows)."""
    import torch
    import torch.nn.functional as F

    L, H = len(encoder_layers(model)), num_heads(model)
    inter = encoder_layers(model)[0].intermediate.dense.out_features
    hm = torch.ones(L, H, requires_grad=True)
    fm = torch.ones(L, inter, requires_grad=True)
    h_acc, f_acc = torch.zeros(L, H), torch.zeros(L, inter)
    model.eval()  # no dropout: the gradient of the model as it will run
    idx = sample_rows(td.tr_y, rows, seed)
    with masks(model, hm, fm):
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            logits = model(**td.tensors([td.tr_ids[i] for i in part])).logits
            loss = F.cross_entropy(logits, torch.tensor([td.tr_y[i] for i in part]))
            gh, gf = torch.autograd.grad(loss, (hm, fm))
            h_acc += gh.abs()
            f_acc += gf.abs()
    h = h_acc / h_acc.norm(dim=1, keepdim=True).clamp(min=1e-12)  # per-layer L2 normalisation
    return h.numpy(), f_acc.numpy()


def val_loss(model, td: TaskData, skip: set[int]) -> float:
    import torch
    import torch.nn.functional as F

    with masks(model, skip=skip):
        logits = torch.from_numpy(predict(model, td, td.va_ids))
    return float(F.cross_entropy(logits, torch.tensor(td.va_y)))


def kept(model, cfg: PruneConfig, progress: Progress) -> tuple[int | None, int | None]:
    """(heads, FFN neurons) each layer keeps, None where nothing is cut: a share that rounds to removing none
    is said so and skipped (cutting "all heads" would still mark the model head-pruned: not plain HF)."""
    H, inter = num_heads(model), encoder_layers(model)[0].intermediate.dense.out_features
    k_h, k_f = max(1, round(H * (1 - cfg.heads))), max(1, round(inter * (1 - cfg.ffn)))
    out = (k_h if cfg.heads and k_h < H else None, k_f if cfg.ffn and k_f < inter else None)
    for flag, share, k, n, what in (("heads", cfg.heads, k_h, H, "heads"), ("ffn", cfg.ffn, k_f, inter, "FFN neurons")):
        if share and k == n:
            if not (cfg.layers or any(k is not None for k in out)):
                raise MillisError(f"nothing to prune: --{flag} {share:g} of {n} {what} per layer removes none "
                                  f"(it rounds to all {n} kept); give a larger share")
            progress("plan", {f"--{flag} {share:g}": f"removes none of the {n} {what} per layer: all kept"})
    return out


def plan(model, td: TaskData, cfg: PruneConfig, progress: Progress) -> Plan:
    L = len(encoder_layers(model))
    if cfg.layers >= L:
        raise MillisError(f"cannot drop {cfg.layers} of the model's {L} layers: at least one must stay")
    k_h, k_f = kept(model, cfg, progress)
    h_imp, f_imp = importance(model, td, cfg.importance_rows, seed=cfg.train.seed)
    skipped: set[int] = set()
    losses = []
    for _ in range(cfg.layers):  # greedy: drop the layer whose absence hurts validation loss least
        trial = {i: val_loss(model, td, skipped | {i}) for i in range(L) if i not in skipped}
        best = min(trial, key=trial.get)
        skipped.add(best)
        losses.append({"dropped": best, "val_loss": trial[best], "tried": trial})
        progress("plan", {"dropped_layer": best, "val_loss": trial[best]})
    layers = [i for i in range(L) if i not in skipped]
    heads = [sorted(np.argsort(-h_imp[i])[:k_h].tolist()) for i in layers] if k_h else None
    ffn = [sorted(np.argsort(-f_imp[i])[:k_f].tolist()) for i in layers] if k_f else None
    return Plan(layers, heads, ffn, {"head_importance": h_imp.round(5).tolist(), "layer_drops": losses})


def apply(model, p: Plan) -> None:
    """Cut `model` in place to plan `p` (layers first: head / neuron lists are per kept layer)."""
    if len(p.layers) < len(encoder_layers(model)):
        cut_layers(model, p.layers)
    if p.heads is not None:
        cut_heads(model, p.heads)
    if p.ffn is not None:
        cut_ffn(model, p.ffn)


def masks_of(model, p: Plan):
    """The masks that make the unpruned `model` compute what the plan's cut model computes."""
    import torch

    L, H = len(encoder_layers(model)), num_heads(model)
    inter = encoder_layers(model)[0].intermediate.dense.out_features
    hm, fm = torch.ones(L, H), torch.ones(L, inter)
    for j, i in enumerate(p.layers):
        if p.heads is not None:
            hm[i] = 0
            hm[i, p.heads[j]] = 1
        if p.ffn is not None:
            fm[i] = 0
            fm[i, p.ffn[j]] = 1
    return masks(model, hm, fm, skip=set(range(L)) - set(p.layers))


def prune(cfg: PruneConfig, progress: Progress = lambda event, fields: None) -> Path:
    """Prune `cfg.train.source` as planned on `cfg.train.data`, recover, write; return the directory."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    src = resolve(cfg.train.source)
    check_encoder(src, "millis prune")
    check_out(cfg, src)
    if not src.has_classifier:
        raise MillisError(f"{src.spec} has no sequence-classification head: pruning ranks heads by the task "
                          f"loss, so fine-tune it first (`millis train`)")
    seed_all(cfg.train.seed, cfg.train.threads)
    original = load_hf(src.path, AutoModelForSequenceClassification).eval()
    encoder_layers(original)  # a clear error for families we cannot cut
    td = prepare(cfg.train, src, classes=[original.config.id2label[i] for i in range(original.config.num_labels)],
                 progress=progress)
    p = plan(original, td, cfg, progress)
    if p.heads is not None:
        progress("plan", {"note": "head-pruned: millis loads it (millis.encoder.hf.load_hf), plain transformers' "
                                  "from_pretrained cannot (size mismatch)"})
    model = copy.deepcopy(original)
    apply(model, p)
    for q in original.parameters():
        q.requires_grad_(False)
    before, acc_original = val_accuracy(model, td), val_accuracy(original, td)

    def loss_of(idx: list[int]):
        x = td.tensors([td.tr_ids[i] for i in idx])
        with torch.no_grad():
            t = original(**x).logits
        return kd_loss(model(**x).logits, t, torch.tensor([td.tr_y[i] for i in idx]),
                       cfg.temperature, cfg.soft_weight, cfg.hard_weight)

    info = {"what": f"recovering {src.spec} pruned to {len(p.layers)} layers, "
                    f"{len(p.heads[0]) if p.heads else num_heads(original)} heads",
            "val_rows": len(td.va_ids), "classes": len(td.classes), "val_accuracy_before_recovery": before,
            "original_val_accuracy": acc_original}
    res = fit(model, cfg.train, [len(r) for r in td.tr_ids], loss_of, lambda: val_accuracy(model, td),
              progress, info=info)
    count = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    extra = {"labels": td.classes, "val_accuracy": res.best,
             "prune": {"layers_kept": p.layers, "heads_kept": p.heads, "ffn_kept": len(p.ffn[0]) if p.ffn else None,
                       "original": {"spec": src.spec, "sha256": src.sha256, "val_accuracy": acc_original},
                       "val_accuracy_before_recovery": before,
                       "parameters": {"original": count(original), "pruned": count(model)}, **p.scores}}
    out = save(model, src, cfg, Path(cfg.train.out), res, data_meta(td), extra, validation=td.val,
               max_length=td.max_len)
    progress("done", {"out": str(out), "val_accuracy": res.best, "best_epoch": res.best_epoch,
                      "val_accuracy_before_recovery": before})
    return out

"""`millis distill`: train a smaller student to behave like a teacher; write a loadable HF directory.

The student starts from the teacher's own layers (evenly spaced, ending at the last one, so the
task head sees the features it was trained on), or is any local model with the same tokenizer.
Loss of a batch (weights in DistillConfig):
    soft    KL(teacher || student) of temperature-scaled logits, x T^2 (Hinton et al.)
    hard    cross-entropy on the labels
    hidden  MSE between student layer i's output and its teacher layer's, padding excluded
    attn    KL between their attention distributions, per head and query (MiniLM-style)
hidden / attn apply where shapes allow (same width, same head count). For `embed` models the
student matches the teacher's pooled sentence vectors (MSE + 1 - cosine) on unlabelled text and
early stopping watches the validation cosine.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from millis.common.config import flag, preset_of
from millis.common.errors import MillisError
from millis.common.files import absolute, copy_regular, hash_files
from millis.train.loop import (Progress, TaskData, check_out, cut_note, data_meta, fit, notes, prepare, save,
                               seed_all, tokenize, train_length, val_accuracy)
from millis.evaluate.seen import distill_texts
from millis.encoder.hf import cut_layers, layer_list, load_hf
from millis.encoder.source import SPLADE, ModelSource, check_encoder, resolve
from millis.encoder.tasks import base_model_kwargs
from millis.train.classify import TRAIN_PRESETS, TrainConfig, train_config

ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling", "2_Normalize")


@dataclass(frozen=True)
class DistillConfig:
    train: TrainConfig               # source = the teacher; data, out and the schedule
    layers: int = flag(0, "student layers (0 = half the teacher's, rounded up)", scoped=True)
    layer_map: tuple[int, ...] = flag((), "teacher layers the student starts from, e.g. 1,3,5 (default: evenly "
                                          "spaced, ending at the last)")
    student: str = flag("", "another local model with the same tokenizer (default: the teacher's own layers)")
    task: str = flag("", "classify or embed (default: classify when the teacher has a classifier head)", scoped=True,
                     choices=("", "classify", "embed"))
    temperature: float = flag(2.0, "softmax temperature of the soft loss", scoped=True)
    soft_weight: float = flag(1.0, "weight of the soft (teacher logits / embeddings) loss")
    hard_weight: float = flag(1.0, "weight of the label loss")
    hidden_weight: float = flag(1.0, "weight of hidden-state transfer")
    attention_weight: float = flag(1.0, "weight of attention transfer")

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise MillisError(f"--layers must be >= 1 (or 0 for half the teacher's), got {self.layers}")
        if self.student and (self.layers or self.layer_map):
            raise MillisError("--layers and --layer-map cut the teacher's own layers into the student; "
                              f"--student {self.student} brings its own layers: give one or the other")
        if self.temperature <= 0:
            raise MillisError(f"--temperature must be > 0, got {self.temperature}")
        if min(self.soft_weight, self.hard_weight, self.hidden_weight, self.attention_weight) < 0:
            raise MillisError("loss weights must be >= 0")
        if self.task not in ("", "classify", "embed"):
            raise MillisError(f"unknown task {self.task!r}; distill supports classify and embed")


DISTILL_PRESETS = TRAIN_PRESETS  # a student trains on the same schedules as `millis train`
STUDENT_DIR = "models/student"   # where `millis distill` writes by default


def distill_config(teacher: str, data: str, preset: str = "default", out: str = STUDENT_DIR,
                   train: dict[str, Any] | None = None, **distill: Any) -> DistillConfig:
    """A DistillConfig from a named preset, schedule overrides (`train`) and distillation fields."""
    tc = train_config(teacher, data, out=out, **{**preset_of(DISTILL_PRESETS, preset, "distillation preset"),
                                                 **(train or {})})
    return DistillConfig(train=tc, **distill)


def student_layers(teacher_layers: int, n: int, layer_map: tuple[int, ...] = (),
                   from_first: bool = False) -> list[int]:
    """Teacher layer indices the student's layers start from (and are matched to). By default the last of each even
    share; from_first (a ModernBERT, whose layer 0 alone has no attention norm: hf.cut_layers) spreads them from layer
    0 to the last."""
    if layer_map:
        if n and len(layer_map) != n:
            raise MillisError(f"--layer-map names {len(layer_map)} layers but --layers is {n}")
        if any(not 0 <= i < teacher_layers for i in layer_map) or list(layer_map) != sorted(set(layer_map)):
            raise MillisError(f"--layer-map must be increasing teacher layers in 0..{teacher_layers - 1}, "
                              f"got {list(layer_map)}")
        if len(layer_map) >= teacher_layers:
            raise MillisError(f"a student needs fewer layers than the teacher's {teacher_layers}; --layer-map names "
                              f"{len(layer_map)}")
        return list(layer_map)
    n = n or -(-teacher_layers // 2)
    if n >= teacher_layers:
        raise MillisError(f"a student needs fewer layers than the teacher's {teacher_layers}, got {n}")
    if from_first:
        return [round(i * (teacher_layers - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]
    return [round((i + 1) * teacher_layers / n) - 1 for i in range(n)]


def _same_tokenizer(a: Path, b: Path) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(a)).get_vocab() == AutoTokenizer.from_pretrained(str(b)).get_vocab()


def build_student(cfg: DistillConfig, src: ModelSource, teacher, cls) -> tuple[Any, list[int] | None]:
    """(student model, teacher layer of each student layer or None when unrelated)."""
    if cfg.student:
        st = resolve(cfg.student)
        if not _same_tokenizer(src.path, st.path):
            raise MillisError(f"student {cfg.student} has another tokenizer than teacher {src.spec}: "
                              f"distillation needs the same token ids")
        kw = {"attn_implementation": "eager"}
        if cls.__name__.endswith("SequenceClassification"):
            kw.update(num_labels=teacher.config.num_labels, id2label=teacher.config.id2label,
                      label2id=teacher.config.label2id, ignore_mismatched_sizes=True)
        student = load_hf(st.path, cls, **kw)
        n_t, n_s = len(layer_list(teacher)), len(layer_list(student))
        return student, [round((i + 1) * n_t / n_s) - 1 for i in range(n_s)]
    first = src.model_type == "modernbert"
    keep = student_layers(len(layer_list(teacher)), cfg.layers, cfg.layer_map, from_first=first)
    student = copy.deepcopy(teacher)
    cut_layers(student, keep)
    for p in student.parameters():  # the teacher is frozen, its copy trains
        p.requires_grad_(True)
    return student.train(), keep


def _masked_mse(a, b, mask):
    # a, b (B, T, H); mask (B, T): mean over real tokens and features
    m = mask.unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1]).clamp(min=1)


def _attention_kl(t, s, mask):
    # t, s (B, nh, T, T) probabilities; KL per (head, real query) row
    eps = 1e-9
    kl = (t * ((t + eps).log() - (s + eps).log())).sum(-1)            # (B, nh, T)
    m = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * m).sum() / m.sum().clamp(min=1)


def kd_loss(s_logits, t_logits, labels, temperature: float, soft_weight: float, hard_weight: float):
    """soft (temperature-scaled KL to the teacher, x T^2) + hard (cross-entropy on labels)."""
    import torch.nn.functional as F

    T = temperature
    soft = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                    log_target=True, reduction="batchmean") * T * T
    return soft_weight * soft + hard_weight * F.cross_entropy(s_logits, labels)


def transfer_loss(cfg: DistillConfig, t_out, s_out, layer_of: list[int] | None, mask):
    """Hidden-state and attention transfer terms (0 when shapes differ or weights are 0)."""
    import torch

    loss = torch.zeros(())
    if layer_of is None:
        return loss
    th, sh = t_out.hidden_states, s_out.hidden_states  # (n+1) x (B, T, H): embeddings, then each layer
    if cfg.hidden_weight and th is not None and th[0].shape[-1] == sh[0].shape[-1]:
        pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_of)]
        loss = loss + cfg.hidden_weight * sum(_masked_mse(sh[i], th[j], mask) for i, j in pairs) / len(pairs)
    ta, sa = t_out.attentions, s_out.attentions
    if cfg.attention_weight and ta is not None and sa and ta[0].shape[1] == sa[0].shape[1]:
        loss = loss + cfg.attention_weight * sum(_attention_kl(ta[t], sa[i], mask)
                                                 for i, t in enumerate(layer_of)) / len(layer_of)
    return loss


def distill(cfg: DistillConfig, progress: Progress = lambda event, fields: None) -> Path:
    """Distil `cfg.train.source` into a student; return the student's directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    src = resolve(cfg.train.source)
    check_encoder(src, "millis distill")
    check_out(cfg, src)
    task = cfg.task or ("classify" if src.has_classifier else "embed")
    if task == "classify" and not src.has_classifier:
        raise MillisError(f"teacher {src.spec} has no sequence-classification head: use --task embed, "
                          f"or fine-tune it first with `millis train`")
    if src.pooling.mode == SPLADE:  # (an embedder's student learns pooled hidden states, not masked-LM logits)
        raise MillisError(f"teacher {src.spec} is a SPLADE model: distilling one is not supported")
    seed_all(cfg.train.seed, cfg.train.threads)
    return (_classify if task == "classify" else _embed)(cfg, src, progress)


def _classify(cfg: DistillConfig, src: ModelSource, progress: Progress) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification

    teacher = load_hf(src.path, AutoModelForSequenceClassification, attn_implementation="eager").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    td = prepare(cfg.train, src, classes=[teacher.config.id2label[i] for i in range(teacher.config.num_labels)],
                 progress=progress)
    student, layer_of = build_student(cfg, src, teacher, AutoModelForSequenceClassification)
    want = {"output_hidden_states": bool(cfg.hidden_weight), "output_attentions": bool(cfg.attention_weight)}

    def loss_of(idx: list[int]):
        x = td.tensors([td.tr_ids[i] for i in idx])
        with torch.no_grad():
            t_out = teacher(**x, **want)
        s_out = student(**x, **want)
        y = torch.tensor([td.tr_y[i] for i in idx])
        return (kd_loss(s_out.logits, t_out.logits, y, cfg.temperature, cfg.soft_weight, cfg.hard_weight)
                + transfer_loss(cfg, t_out, s_out, layer_of, x["attention_mask"]))

    teacher_acc = val_accuracy(teacher, td)
    info = {"what": f"distilling {src.spec} ({len(layer_list(teacher))} layers) into "
                    f"{len(layer_list(student))} layers", "val_rows": len(td.va_ids), "classes": len(td.classes),
            "teacher_val_accuracy": teacher_acc}
    res = fit(student, cfg.train, [len(r) for r in td.tr_ids], loss_of, lambda: val_accuracy(student, td),
              progress, info=info)
    extra = {"labels": td.classes, "val_accuracy": res.best,
             "distill": _recipe(cfg, "classify", src, teacher, student, layer_of, teacher_acc)}
    out = save(student, src, cfg, Path(cfg.train.out), res, data_meta(td), extra, validation=td.val,
               max_length=td.max_len)
    progress("done", {"out": str(out), "val_accuracy": res.best, "best_epoch": res.best_epoch,
                      "teacher_val_accuracy": teacher_acc})
    return out


def _recipe(cfg, task, src, teacher, student, layer_of, teacher_score) -> dict[str, Any]:
    return {"task": task, "teacher": {"spec": src.spec, "sha256": src.sha256, "layers": len(layer_list(teacher))},
            "student_layers": len(layer_list(student)), "layer_map": layer_of, "student_source": cfg.student,
            "teacher_score": teacher_score,
            "parameters": {"teacher": sum(p.numel() for p in teacher.parameters()),
                           "student": sum(p.numel() for p in student.parameters())}}


def _embed(cfg: DistillConfig, src: ModelSource, progress: Progress) -> Path:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from millis.encoder.tasks import pool
    from millis.encoder.text import TextEncoder
    from millis.common.readers import read_texts

    teacher = load_hf(src.path, AutoModel, attn_implementation="eager", **base_model_kwargs(src.model_type)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, layer_of = build_student(cfg, src, teacher, AutoModel)
    texts = distill_texts(cfg.train.data, cfg.train.text_col, cfg.train.limit, cfg.train.sample, cfg.train.seed)
    if cfg.train.validation:  # --validation FILE: its texts score the epochs and never train
        val_texts = list(dict.fromkeys(read_texts(cfg.train.validation, cfg.train.text_col)))
        held = set(val_texts)
        tr_texts = [t for t in texts if t not in held]
        where = cfg.train.validation
    else:
        order = list(range(len(texts)))
        random.Random(cfg.train.seed).shuffle(order)
        n_val = max(1, int(round(len(texts) * cfg.train.val_fraction)))
        tr_texts, val_texts = [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]
        where = f"{cfg.train.val_fraction:.0%} held out"
    if len(tr_texts) < 3 or not val_texts:
        raise MillisError(f"{cfg.train.data}: {len(tr_texts)} training and {len(val_texts)} validation texts "
                          "are too few to distil an embedder")
    max_len = train_length(cfg.train, src, notes(progress))
    tok = AutoTokenizer.from_pretrained(str(src.path))
    tr, tr_cut = tokenize(tok, tr_texts, max_len)
    va, va_cut = tokenize(tok, val_texts, max_len)
    cut_note(tr_cut, len(tr), va_cut, len(va), max_len, progress)
    td = TaskData(None, [], tr, [], va, [], TextEncoder(src.path, ("input_ids", "attention_mask"), max_len),
                  max_len, where, truncated={"train": tr_cut, "validation": va_cut})
    want = {"output_hidden_states": bool(cfg.hidden_weight), "output_attentions": bool(cfg.attention_weight)}

    def vectors(model, x, **k):
        out = model(**x, **k)
        return out, pool(out.last_hidden_state, x["attention_mask"], src.pooling)

    def loss_of(idx: list[int]):
        x = td.tensors([tr[i] for i in idx])
        with torch.no_grad():
            t_out, t_vec = vectors(teacher, x, **want)
        s_out, s_vec = vectors(student, x, **want)
        match = F.mse_loss(s_vec, t_vec) + (1 - F.cosine_similarity(s_vec, t_vec, dim=-1)).mean()
        return cfg.soft_weight * match + transfer_loss(cfg, t_out, s_out, layer_of, x["attention_mask"])

    def score() -> float:  # mean cosine to the teacher on held-out texts
        cos = []
        with torch.inference_mode():
            student.eval()
            for s in range(0, len(va), 64):
                x = td.tensors(va[s:s + 64])
                cos += F.cosine_similarity(vectors(student, x)[1], vectors(teacher, x)[1], dim=-1).tolist()
            student.train()
        return float(np.mean(cos))

    info = {"what": f"distilling embedder {src.spec} into {len(layer_list(student))} layers", "val_rows": len(va)}
    res = fit(student, cfg.train, [len(r) for r in tr], loss_of, score, progress, score_name="val_cosine", info=info)

    def write_model(d: Path) -> None:
        student.save_pretrained(str(d))
        for name in ST_FILES:  # keep the sentence-transformers pooling so the student pools alike
            copy_regular(src.path / name, d / name)

    data = {"path": absolute(cfg.train.data), "sha256": hash_files([Path(cfg.train.data)]), "rows": len(texts),
            "text_col": cfg.train.text_col, "validation": td.validation, "truncated": td.truncated}
    extra = {"val_cosine": res.best, "distill": _recipe(cfg, "embed", src, teacher, student, layer_of, 1.0)}
    out = save(student, src, cfg, Path(cfg.train.out), res, data, extra, write_model=write_model, max_length=max_len)
    progress("done", {"out": str(out), "val_cosine": res.best, "best_epoch": res.best_epoch})
    return out


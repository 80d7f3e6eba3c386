"""`millis train`, `millis distill`, `millis prune`: flags into a config, a progress bar, the call."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable


def env(name: str, default):
    """Every flag can also come from MILLIS_<NAME> in the environment."""
    return os.environ.get("MILLIS_" + name.upper().replace("-", "_"), default)


# Schedule flags shared by the three commands; they override the preset (MILLIS_* values arrive as
# strings: typed here).
TRAIN_FLAGS = {"text_col": str, "label_col": str, "epochs": int, "batch_size": int, "lr": float,
               "weight_decay": float, "warmup": float, "patience": int, "max_length": int, "seed": int,
               "limit": int, "sample": int, "threads": int, "val_fraction": float}


def _schedule_flags(p: argparse.ArgumentParser, presets: str) -> None:
    p.add_argument("--data", required=env("data", None) is None, default=env("data", None), help="training file")
    p.add_argument("--preset", default=env("preset", "default"), help=presets)
    p.add_argument("--validation", default=env("validation", ""), help="labelled validation file (default: hold out)")
    for name, typ in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=env(name, None),
                       help=f"TrainConfig.{name} (default: the preset's)")


def _opt(p: argparse.ArgumentParser, name: str, typ, default, help: str) -> None:
    p.add_argument("--" + name.replace("_", "-"), type=typ, default=typ(env(name, default)), help=help)


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="fine-tune a sequence classifier on a labelled CSV/TSV/JSONL file")
    t.add_argument("source", help="local Hugging Face model dir, builtin:minilm, or tiny:bert...")
    t.add_argument("--out", default=env("out", "models/classifier"), help="model directory to write")
    _schedule_flags(t, "default, or quick (1 epoch, 512 sampled rows)")

    d = sub.add_parser("distill", help="distil a model into a smaller student (its own layers, or another model)")
    d.add_argument("teacher", help="model dir from `millis train` (classify) or any encoder dir (embed)")
    d.add_argument("--out", default=env("out", "models/student"), help="student directory to write")
    _schedule_flags(d, "default, or quick (1 epoch, 512 sampled rows)")
    _opt(d, "layers", int, 0, "student layers (0 = half the teacher's)")
    d.add_argument("--layer-map", default=env("layer_map", ""), help="teacher layers to start from, e.g. 1,3,5")
    d.add_argument("--student", default=env("student", ""), help="another local model with the same tokenizer")
    d.add_argument("--task", default=env("task", ""), choices=["", "classify", "embed"],
                   help="default: classify when the teacher has a classifier head")
    for name, default, what in (("temperature", 2.0, "softmax temperature of the soft loss"),
                                ("soft_weight", 1.0, "weight of the soft (teacher logits / embeddings) loss"),
                                ("hard_weight", 1.0, "weight of the label loss"),
                                ("hidden_weight", 1.0, "weight of hidden-state transfer"),
                                ("attention_weight", 1.0, "weight of attention transfer")):
        _opt(d, name, float, default, what)

    p = sub.add_parser("prune", help="remove attention heads / FFN neurons / layers by importance, then recover")
    p.add_argument("model", help="model dir from `millis train` (a classifier)")
    p.add_argument("--out", default=env("out", "models/pruned"), help="pruned model directory to write")
    _schedule_flags(p, "default (2 recovery epochs), or quick")
    _opt(p, "heads", float, 0.0, "share of attention heads to remove in every layer, in (0, 1)")
    _opt(p, "ffn", float, 0.0, "share of FFN neurons to remove in every layer, in (0, 1)")
    _opt(p, "layers", int, 0, "whole layers to drop")
    _opt(p, "importance_rows", int, 1024, "training rows that score heads and neurons")
    _opt(p, "temperature", float, 2.0, "softmax temperature of the recovery's soft loss")


def _overrides(a) -> dict[str, Any]:
    return {n: typ(getattr(a, n)) for n, typ in TRAIN_FLAGS.items() if getattr(a, n) is not None}


def _run(fn: Callable, cfg, summary: Callable[[dict], str]) -> int:
    """Run a training function with a progress bar; print `summary(millis.json)` at the end."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from millis.artifact.meta import read_train_meta

    console = Console(stderr=True)
    cols = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} rows/s"), TimeRemainingColumn())
    with Progress(*cols, console=console) as bar:
        task = None

        def progress(event: str, f: dict) -> None:
            nonlocal task
            if event == "plan":
                console.log(", ".join(f"{k} {v}" for k, v in f.items()))
            elif event == "start":
                extra = "".join(f", {k.replace('_', ' ')} {100 * v:.2f}%" for k, v in f.items()
                                if k.endswith("accuracy"))
                console.log(f"{f.get('what', 'training')}: {f['rows']} rows"
                            + (f", validating on {f['val_rows']}" if "val_rows" in f else "") + extra)
                task = bar.add_task("train", total=f["steps_per_epoch"], epoch=1, loss=0.0, rate=0.0)
            elif event == "step":
                bar.update(task, completed=f["step"], epoch=f["epoch"], loss=f["loss"], rate=f["rows_per_s"])
            elif event == "epoch":
                name = next(k for k in ("val_accuracy", "val_cosine") if k in f)
                console.log(f"epoch {f['epoch']}: train loss {f['train_loss']:.4f}, {name.replace('_', ' ')} "
                            f"{100 * f[name]:.2f}%{' (best)' if f['improved'] else ''}, {f['seconds']:.0f} s")
                bar.reset(task, total=bar.tasks[0].total)
        out = fn(cfg, progress)
    print(f"model: {out}  ({summary(read_train_meta(out))})")
    return 0


def _score(meta: dict) -> str:
    if "val_accuracy" in meta:
        return f"best epoch {meta['best_epoch']}, validation accuracy {100 * meta['val_accuracy']:.2f}%"
    return f"best epoch {meta['best_epoch']}, validation cosine to the teacher {meta['val_cosine']:.4f}"


def train_cmd(a) -> int:
    from millis.train.classify import train, train_config

    cfg = train_config(a.source, a.data, a.preset, out=a.out, validation=a.validation, **_overrides(a))
    return _run(train, cfg, lambda m: f"{_score(m)}, {len(m['labels'])} labels")


def distill_cmd(a) -> int:
    from millis.train.distill import distill, distill_config
    from millis.common.errors import MillisError

    try:
        layer_map = tuple(int(x) for x in a.layer_map.split(",") if x.strip())
    except ValueError:
        raise MillisError(f"--layer-map must be comma-separated layer numbers, got {a.layer_map!r}") from None
    cfg = distill_config(a.teacher, a.data, a.preset, out=a.out, train={"validation": a.validation, **_overrides(a)},
                         layers=a.layers, layer_map=layer_map, student=a.student, task=a.task,
                         temperature=a.temperature, soft_weight=a.soft_weight, hard_weight=a.hard_weight,
                         hidden_weight=a.hidden_weight, attention_weight=a.attention_weight)
    return _run(distill, cfg, lambda m: f"{m['distill']['student_layers']} layers, {_score(m)}")


def prune_cmd(a) -> int:
    from millis.train.prune import prune, prune_config

    cfg = prune_config(a.model, a.data, a.preset, out=a.out, train={"validation": a.validation, **_overrides(a)},
                       heads=a.heads, ffn=a.ffn, layers=a.layers, importance_rows=a.importance_rows,
                       temperature=a.temperature)

    def summary(m: dict) -> str:
        p = m["prune"]
        return (f"{len(p['layers_kept'])} layers, {len(p['heads_kept'][0]) if p['heads_kept'] else 'all'} heads, "
                f"{p['parameters']['pruned']:,} of {p['parameters']['original']:,} parameters; before recovery "
                f"{100 * p['val_accuracy_before_recovery']:.2f}%, {_score(m)}")
    return _run(prune, cfg, summary)


FIT_COMMANDS = {"train": train_cmd, "distill": distill_cmd, "prune": prune_cmd}

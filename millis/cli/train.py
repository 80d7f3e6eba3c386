"""`millis train`, `millis distill`, `millis prune`: flags into a config, a progress bar, the call.

The three share TrainConfig's flags (the schedule); `--preset` picks a named schedule and the flags
given override it. Each command's own flags (the positional model, `--out`, `--preset`) come first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from millis.artifact.meta import TrainMeta
from millis.cli.flags import Command, Given
from millis.common.config import flag
from millis.train.classify import TRAIN_PRESETS, TrainConfig, train_config
from millis.train.distill import DISTILL_PRESETS, STUDENT_DIR, DistillConfig, distill_config
from millis.train.prune import PRUNE_PRESETS, PRUNED_DIR, PruneConfig, prune_config
from millis.train.step_log import StepLog

PRESET_HELP = "named schedule: {}; the flags given override it"


def presets(table: dict[str, dict[str, Any]]) -> str:
    """`default, quick (epochs=1, sample=512, batch_size=16)`: what each preset sets."""
    return ", ".join(name + (f" ({', '.join(f'{k}={v}' for k, v in o.items())})" if o else "")
                     for name, o in table.items())


@dataclass(frozen=True)
class TrainFlags:
    """`millis train`'s own flag; the rest are TrainConfig's."""

    preset: str = flag("default", PRESET_HELP.format(presets(TRAIN_PRESETS)), choices=tuple(TRAIN_PRESETS),
                       scoped=True)


@dataclass(frozen=True)
class DistillFlags:
    """`millis distill`'s own flags; the rest are TrainConfig's (the schedule) and DistillConfig's."""

    source: str = flag(help="the teacher: a model dir from `millis train` (classify) or any encoder dir (embed)")
    out: str = flag(STUDENT_DIR, "student directory to write", scoped=True)
    preset: str = flag("default", PRESET_HELP.format(presets(DISTILL_PRESETS)), choices=tuple(DISTILL_PRESETS),
                       scoped=True)


@dataclass(frozen=True)
class PruneFlags:
    """`millis prune`'s own flags; the rest are TrainConfig's (the recovery schedule) and PruneConfig's."""

    source: str = flag(help="the model to prune: a model dir from `millis train` (a classifier)")
    out: str = flag(PRUNED_DIR, "pruned model directory to write", scoped=True)
    preset: str = flag("default", PRESET_HELP.format(presets(PRUNE_PRESETS)), choices=tuple(PRUNE_PRESETS),
                       scoped=True)


def train_config_of(given: Given) -> TrainConfig:
    schedule, preset = given.of(TrainConfig), given.build(TrainFlags).preset
    with given.named():  # a bad MILLIS_* value is named as the variable, not as its flag
        return train_config(schedule.pop("source"), schedule.pop("data"), preset, **schedule)


def distill_config_of(given: Given) -> DistillConfig:
    own, schedule = given.build(DistillFlags), given.of(TrainConfig)
    with given.named():
        return distill_config(own.source, schedule.pop("data"), own.preset, out=own.out, train=schedule,
                              **given.of(DistillConfig))


def prune_config_of(given: Given) -> PruneConfig:
    own, schedule = given.build(PruneFlags), given.of(TrainConfig)
    with given.named():
        return prune_config(own.source, schedule.pop("data"), own.preset, out=own.out, train=schedule,
                            **given.of(PruneConfig))


def with_progress(fn: Callable, cfg, summary: Callable[[TrainMeta], str]) -> int:
    """Run a training function with a progress bar; print `summary(millis.json)` at the end."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from millis.artifact.meta import read_train_meta

    console = Console(stderr=True)
    cols = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} rows/s"), TimeRemainingColumn())
    steps = None if console.is_terminal else StepLog()  # a file: lines instead of a bar it would not show
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
                if steps:
                    steps.restart()
            elif event == "step":
                bar.update(task, completed=f["step"], epoch=f["epoch"], loss=f["loss"], rate=f["rows_per_s"])
                if steps and (line := steps.line(f, bar.tasks[0].total)):
                    console.log(line)
            elif event == "diverged":
                console.log(f"the loss was {f['loss']} at epoch {f['epoch']} step {f['step']}: training stopped "
                            "there, the best epoch before it is kept")
            elif event == "epoch":
                name = next(k for k in ("val_accuracy", "val_cosine") if k in f)
                console.log(f"epoch {f['epoch']}: train loss {f['train_loss']:.4f}, {name.replace('_', ' ')} "
                            f"{100 * f[name]:.2f}%{' (best)' if f['improved'] else ''}, {f['seconds']:.0f} s")
                bar.reset(task, total=bar.tasks[0].total)
                if steps:
                    steps.restart()
        out = fn(cfg, progress)
    print(f"model: {out}  ({summary(read_train_meta(out))})")
    return 0


def score(meta: TrainMeta) -> str:
    if meta.val_accuracy is not None:
        return f"best epoch {meta.best_epoch}, validation accuracy {100 * meta.val_accuracy:.2f}%"
    return f"best epoch {meta.best_epoch}, validation cosine to the teacher {meta.val_cosine:.4f}"


def run_train(cfg: TrainConfig) -> int:
    from millis.train.classify import train

    return with_progress(train, cfg, lambda m: f"{score(m)}, {len(m.labels)} labels")


def run_distill(cfg: DistillConfig) -> int:
    from millis.train.distill import distill

    return with_progress(distill, cfg, lambda m: f"{m.distill.student_layers} layers, {score(m)}")


def run_prune(cfg: PruneConfig) -> int:
    from millis.train.prune import prune

    def summary(m: TrainMeta) -> str:
        p = m.prune
        return (f"{len(p.layers_kept)} layers, {len(p.heads_kept[0]) if p.heads_kept else 'all'} heads, "
                f"{p.parameters['pruned']:,} of {p.parameters['original']:,} parameters; before recovery "
                f"{100 * p.val_accuracy_before_recovery:.2f}%, {score(m)}")
    return with_progress(prune, cfg, summary)


TRAIN = Command("train", "fine-tune a sequence classifier on a labelled CSV/TSV/JSONL file",
                lambda: (TrainFlags, TrainConfig), train_config_of, run_train, positionals=("source",),
                preset=lambda: TRAIN_PRESETS["default"])
DISTILL = Command("distill", "distil a model into a smaller student (its own layers, or another model)",
                  lambda: (DistillFlags, TrainConfig, DistillConfig), distill_config_of, run_distill,
                  positionals=("source",), preset=lambda: DISTILL_PRESETS["default"])
PRUNE = Command("prune", "remove attention heads / FFN neurons / layers by importance, then recover",
                lambda: (PruneFlags, TrainConfig, PruneConfig), prune_config_of, run_prune, positionals=("source",),
                preset=lambda: PRUNE_PRESETS["default"])

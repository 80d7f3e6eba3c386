"""`millis optimize`: flags into an OptimizeConfig, then the pipeline with a live progress line."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from millis.cli.flags import Command, Given
from millis.common.config import preset_of
from millis.common.errors import MillisError

if TYPE_CHECKING:
    from millis.optimize.config import OptimizeConfig


def groups() -> tuple[type, ...]:
    from millis.optimize.config import Budget, MeasureConfig, OptimizeConfig

    return OptimizeConfig, MeasureConfig, Budget


def config(given: Given) -> OptimizeConfig:
    """The --preset's MeasureConfig with the measurement flags given (--shapes, --iters, --threads) on top."""
    from millis.optimize.compress import COMPRESS_PRESETS
    from millis.optimize.config import PRESETS, Budget, MeasureConfig, OptimizeConfig

    cfg = given.build(OptimizeConfig, budget=given.build(Budget))
    # flags only: MILLIS_LABEL_COL / MILLIS_MAX_DROP may be set for the other commands (train, eval) that read them
    unused = [f for f in ("max_drop", "label_col")
              if f in {**given.of(Budget), **given.of(OptimizeConfig)} and f not in given.variables]
    if cfg.task != "classify" and unused:  # a run that ignored --max-drop 0 said "within budget"
        raise MillisError(f"{', '.join('--' + f.replace('_', '-') for f in unused)}: for --task classify (labelled "
                          f"rows); --task {cfg.task} is judged by fidelity to fp32 "
                          f"({'--min-cosine' if cfg.task == 'embed' else '--max-logit-diff and the ranking'})")
    other = {"min_cosine": cfg.task != "embed", "max_logit_diff": cfg.task == "embed",  # gates the task never reads
             "min_order_agreement": cfg.task != "rerank"}
    ignored = [f for f, no in other.items() if no and f in given.of(Budget) and f not in given.variables]
    if ignored:
        raise MillisError(f"{', '.join('--' + f.replace('_', '-') for f in ignored)}: not a gate of --task {cfg.task} "
                          f"(embed: --min-cosine; classify: --max-logit-diff, or --max-drop with labelled rows; "
                          f"rerank: --min-order-agreement, the top document and --max-logit-diff)")
    with given.named():
        if cfg.compress:  # checked now, not after the variants are built
            preset_of(COMPRESS_PRESETS, cfg.compress, "--compress preset")
        preset = preset_of(PRESETS, cfg.preset, "--preset")
    return replace(cfg, measure=given.build(MeasureConfig, base=preset))


def run(cfg: OptimizeConfig) -> int:
    from rich.console import Console

    from millis.optimize.pipeline import optimize

    console = Console(stderr=True)
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            console.log(msg)
            status.update(msg)
        out = optimize(cfg, progress)
    print((out / "report.md").read_text())
    print(f"artifact: {out} (report.html: the same with charts)")
    return 0


COMMAND = Command("optimize", "export, fuse, quantize and measure variants; write the fastest as an artifact",
                  groups, config, run, positionals=("source",))

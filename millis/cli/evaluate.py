"""`millis eval`: flags into an EvalConfig, the evaluation, a per-class table (or the agreement with fp32);
with `--text FILE`, the perplexity of a decoder on that text instead (an EvalTextConfig)."""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from millis.cli.flags import Command, Given, check_out_file
from millis.common.config import flag
from millis.common.errors import MillisError
from millis.common.files import replace_text
from millis.evaluate.run import EvalConfig


@dataclass(frozen=True)
class EvalFlags:
    """`millis eval`'s own flags (its output files); the rest are EvalConfig's."""

    json: str = flag("", "also write the full result to this JSON file", scoped=True)
    predictions: str = flag("", "also write a classifier's prediction for each evaluated row to this JSON Lines file "
                                "(row, line, text, label, predicted, score, correct, truncated; in the data's order)",
                            scoped=True)


def groups() -> tuple[type, ...]:
    from millis.gen.perplexity import EvalTextConfig  # imports torch: only for this command

    return EvalConfig, EvalFlags, EvalTextConfig


def config(given: Given):
    from millis.gen.perplexity import EvalTextConfig

    own = given.build(EvalFlags)
    data, text = given.of(EvalConfig).get("data"), given.of(EvalTextConfig).get("text")
    with given.named():  # an error names the MILLIS_* variable a path came from
        if own.predictions and text:
            raise MillisError("--predictions (a classifier's per-row predictions on --data) does not apply to --text "
                              "(a decoder's perplexity): leave --predictions out")
        check_out_files(own, ("--data", data) if data else ("--text", text) if text else None)
    if text:  # a decoder on a text: model and threads are EvalConfig's flags
        if data:
            raise MillisError("--data (labelled data) and --text (a decoder's perplexity) are two kinds of "
                              "evaluation: give one")
        shared = {k: v for k, v in given.of(EvalConfig).items() if k in ("model", "threads")}
        return given.build(EvalTextConfig, **shared), own
    return given.build(EvalConfig), own  # without --data: EvalConfig's error names both flags


def check_out_files(own: EvalFlags, source: tuple[str, str] | None) -> None:
    """--json and --predictions: writable (check_out_file), neither the file evaluated (`source`: its flag and path;
    writing the result over it would destroy the rows) nor one another."""
    outs = [(option, path) for option, path in (("--json", own.json), ("--predictions", own.predictions)) if path]
    for option, path in outs:
        check_out_file(path, option)
        if source is not None and same_file(path, source[1]):
            raise MillisError(f"{option} {path}: is the file evaluated ({source[0]} {source[1]}); writing there would "
                              f"replace its rows: name another file")
    if len(outs) == 2 and same_file(own.json, own.predictions):
        raise MillisError(f"--json {own.json} and --predictions {own.predictions} name one file: name two")


def same_file(a: str, b: str) -> bool:
    """a and b are one file: the same inode where both exist (a hard link, a symlink), else the same resolved path."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def run_perplexity(cfg, own: EvalFlags) -> int:
    from millis.gen.perplexity import perplexity

    r = perplexity(cfg)
    # which weights gave the figure (a quantized variant's beside fp32's); an infinite perplexity (a token the
    # model rules out) is null, as JSON has no infinity
    res = {"model": cfg.model, "text": cfg.text, "context": cfg.context, "stride": cfg.window_stride,
           "dtype": cfg.dtype, "quant": cfg.quant, "score_tokens": cfg.score_tokens,
           "perplexity": round(r.perplexity, 4) if math.isfinite(r.perplexity) else None,
           "nll": round(r.nll, 5) if math.isfinite(r.nll) else None, "tokens": r.tokens, "windows": r.windows,
           "tokens_per_s": round(r.tokens_per_s, 1)}
    if own.json:
        replace_text(Path(own.json), json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


def run(args: tuple[EvalConfig, EvalFlags]) -> int:
    from millis.evaluate.run import evaluate

    cfg, own = args
    if not isinstance(cfg, EvalConfig):
        return run_perplexity(cfg, own)
    res = evaluate(cfg, predictions=own.predictions)
    if own.json:
        replace_text(Path(own.json), json.dumps(res, indent=2))
    print(f"model {cfg.model} ({res['variant']}, {res['task']}) on {cfg.data}: {res['n']} rows, {res['seconds']:.1f} s")
    if own.predictions:
        print(f"per-row predictions: {own.predictions} ({res['n']} rows)")
    if res["seen_by_selection"]:
        rows = f" ({res['selection_rows']} of its {res['n']} rows)" if res.get("selection_rows") else ""
        print(f"warning: {cfg.data} holds the rows that selected this model{rows} (optimize's selection data or "
              f"training's validation rows): these figures are not a test score; report on a file selection never "
              f"saw", file=sys.stderr)
    if res["trained_on"]:
        print(f"warning: {cfg.data} is the file this model (or the model it was built from) trained on: these "
              f"figures are not a test score", file=sys.stderr)
    if res["task"] == "classify":
        print(f"accuracy {100 * res['accuracy']:.2f}%   macro-F1 {100 * res['macro_f1']:.2f}%\n")
        print(f"{'label':<40} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for label, m in res["per_class"].items():
            print(f"{label[:40]:<40} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8d}")
    elif res.get("reference") == "self":  # a plain model: nothing to compare its embeddings with
        label = f"; nearest-neighbour label accuracy {100 * res['nn_label_accuracy']:.2f}%" \
            if res.get("nn_label_accuracy") is not None else ""
        print(f"{cfg.model} is its own fp32 reference: no agreement to report{label}")
    else:
        print("agreement with fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                                                  if k in ("cos_min", "cos_mean", "nn_agreement", "top10_overlap")))
        if res.get("nonfinite_rows"):
            print(f"warning: {res['nonfinite_rows']} of the {res['n']} embeddings hold NaN or Inf")
    return 0


COMMAND = Command("eval", "accuracy / macro-F1 / per-class of a model or artifact on labelled data; with --text, "
                          "the perplexity of a decoder (GGUF, HF or llama2.c) on a text file", groups, config, run,
                  positionals=("model",))

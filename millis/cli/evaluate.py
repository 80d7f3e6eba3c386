"""`millis eval`: flags into an EvalConfig, the evaluation, a per-class table (or the agreement with fp32);
with `--text FILE`, the perplexity of a decoder on that text instead (an EvalTextConfig)."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from millis.cli.flags import Command, Given, check_out_file
from millis.common.config import flag
from millis.common.errors import MillisError
from millis.evaluate.run import EvalConfig


@dataclass(frozen=True)
class EvalFlags:
    """`millis eval`'s own flag; the rest are EvalConfig's."""

    json: str = flag("", "also write the full result to this JSON file", scoped=True)


def groups() -> tuple[type, ...]:
    from millis.gen.perplexity import EvalTextConfig  # imports torch: only for this command

    return EvalConfig, EvalFlags, EvalTextConfig


def config(given: Given):
    from millis.gen.perplexity import EvalTextConfig

    own = given.build(EvalFlags)
    if own.json:
        check_out_file(own.json, "--json")
    data = given.of(EvalConfig).get("data")
    if given.of(EvalTextConfig).get("text"):  # a decoder on a text: model and threads are EvalConfig's flags
        if data:
            raise MillisError("--data (labelled data) and --text (a decoder's perplexity) are two kinds of "
                              "evaluation: give one")
        shared = {k: v for k, v in given.of(EvalConfig).items() if k in ("model", "threads")}
        return given.build(EvalTextConfig, **shared), own
    return given.build(EvalConfig), own  # without --data: EvalConfig's error names both flags


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
        Path(own.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


def run(args: tuple[EvalConfig, EvalFlags]) -> int:
    from millis.evaluate.run import evaluate

    cfg, own = args
    if not isinstance(cfg, EvalConfig):
        return run_perplexity(cfg, own)
    res = evaluate(cfg)
    if own.json:
        Path(own.json).write_text(json.dumps(res, indent=2))
    print(f"model {cfg.model} ({res['variant']}, {res['task']}) on {cfg.data}: {res['n']} rows, {res['seconds']:.1f} s")
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

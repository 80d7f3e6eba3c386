"""`millis info` (an artifact's recipe and measured figures) and `millis predict` (run it on texts)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from millis.cli.flags import Command, Given
from millis.common.config import check_at_least, flag
from millis.common.errors import MillisError
from millis.common.readers import text_lines

ARTIFACT_HELP = "artifact directory written by `millis optimize`"


@dataclass(frozen=True)
class InfoFlags:
    artifact: str = flag(help=ARTIFACT_HELP)
    json: bool = flag(False, "print millis.json", scoped=True)


@dataclass(frozen=True)
class PredictFlags:
    artifact: str = flag(help=ARTIFACT_HELP)
    texts: tuple[str, ...] = flag(help="texts to run, or - to read one per line from stdin", env=False)
    threads: int = flag(0, "intra-op threads (0 = all cores)")

    def __post_init__(self) -> None:
        check_at_least(self, 0, "threads")


def info(a: InfoFlags) -> int:
    from millis.artifact.store import read_meta
    from millis.optimize.report import config_of

    meta = read_meta(a.artifact)
    if a.json:
        print(json.dumps(meta.to_dict(), indent=2))
        return 0
    m, v, src, hw = meta.measured, meta.variant, meta.source, meta.hardware
    print(f"artifact   {a.artifact} (format v{meta.version}, millis {meta.millis_version})")
    print(f"source     {src.spec} ({src.model_type}, sha256 {src.sha256[:12]})")
    pooled = f" ({src.pooling.mode} pooling{', normalized' if src.pooling.normalize else ''})" \
        if meta.task == "embed" else ""
    print(f"task       {meta.task} -> {meta.output}{pooled}; max length {meta.max_length}")
    print(f"variant    {v.name}: {v.runtime} {v.precision}, passes {' > '.join(v.passes) or '-'}")
    for shape, s in m.latency.items():
        print(f"  {shape:>10}  p50 {s.p50_ms:.2f} ms  p99 {s.p99_ms:.2f} ms  ({s.n} calls)")
    if m.serve_mix:
        print(f"serve mix  {m.serve_mix.rows_per_s:.1f} rows/s over {len(m.serve_mix.shapes)} new shapes, cold then "
              f"warm; worst call {m.serve_mix.worst_ms:.0f} ms at {m.serve_mix.worst_shape}")
    print(f"fidelity   {json.dumps({k: round(x, 6) for k, x in m.fidelity.items()})}")
    if m.accuracy:
        cfg = config_of(meta)
        ref = "-" if m.reference_accuracy is None else f"{100 * m.reference_accuracy:.2f}%"
        print(f"accuracy   {100 * m.accuracy.accuracy:.2f}% on {cfg.data} "
              f"(fp32 {ref}, budget -{cfg.budget.max_drop} pt)")
    if meta.compressed:
        c = meta.compressed
        print(f"compressed {c.name}: {c.layers} layers, {c.heads} heads, FFN {c.intermediate} (student {c.model})")
    if v.keep_fp32:
        print(f"kept fp32  {len(v.keep_fp32)} node(s): {', '.join(v.keep_fp32)}")
    print(f"hardware   {hw.cpu}{f' ({hw.cpu_id})' if hw.cpu_id else ''}, {hw.cores} cores, {' '.join(hw.isa)}")
    return 0


def stdin_texts(stream: Any) -> list[str]:
    """One text per non-blank line of a binary stream, decoded as UTF-8 here: the text layer's surrogateescape
    (a C locale, UTF-8 mode) would turn a bad byte into a lone surrogate the tokenizer fails on with a TypeError."""
    data = stream.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MillisError(f"stdin: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    return [t for t in text_lines(text) if t.strip()]


def predict(a: PredictFlags) -> int:
    import numpy as np

    from millis.artifact.model import load
    from millis.encoder.source import SPLADE

    texts = stdin_texts(sys.stdin.buffer) if a.texts == ("-",) else list(a.texts)
    for i, t in enumerate(texts, start=1):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # an argument holding bytes that are not UTF-8 (surrogate-escaped by Python)
            raise MillisError(f"text {i} is not valid UTF-8") from None
    model = load(a.artifact, threads=a.threads)
    if model.task == "classify":
        for t, p in zip(texts, model.predict(texts)):
            print(json.dumps({"text": t, "label": p["label"], "score": round(p["score"], 4),  # a JSON line each
                              "truncated": p["truncated"]}))
    else:
        res = model.run(texts)
        sparse = model.meta.source.pooling.mode == SPLADE  # a SPLADE vector: its heaviest vocabulary entries
        for t, e, cut in zip(texts, res.outputs, res.truncated):
            head = {"embedding_head": [round(float(x), 4) for x in e[:4]]}
            if sparse:
                top = [int(i) for i in np.argsort(-e, kind="stable")[:8] if e[i] > 0]
                head = {"nonzero": int(np.count_nonzero(e)), "top": [
                    [tok, round(float(e[i]), 4)] for i, tok in zip(top, model.encoder.token_strings(top))]}
            print(json.dumps({"text": t, "dim": len(e), **head, "truncated": cut}))
    return 0


def info_flags(given: Given) -> InfoFlags:
    return given.build(InfoFlags)


def predict_flags(given: Given) -> PredictFlags:
    return given.build(PredictFlags)


INFO = Command("info", "show an artifact's recipe and measured figures", lambda: (InfoFlags,), info_flags, info,
               positionals=("artifact",))
PREDICT = Command("predict", "run an artifact on texts (arguments, or one per line on stdin with -)",
                  lambda: (PredictFlags,), predict_flags, predict, positionals=("artifact", "texts"))

"""`millis` command line: parses flags into a config and calls the stage's function. Nothing else."""
from __future__ import annotations

import argparse
import json
import os
import sys

from millis.errors import MillisError


def _env(name: str, default):
    """Every flag can also come from MILLIS_<NAME> in the environment."""
    return os.environ.get("MILLIS_" + name.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="millis", description="Make transformer inference millisecond-fast, and prove it.")
    sub = p.add_subparsers(dest="cmd", required=True)

    o = sub.add_parser("optimize", help="export, fuse, quantize and measure variants; write the fastest as an artifact")
    o.add_argument("source", help="local Hugging Face model dir, builtin:minilm, or tiny:bert|distilbert|roberta|xlm-roberta")
    o.add_argument("--task", default=_env("task", "embed"), choices=["classify", "embed"], help="what the model is for")
    o.add_argument("--out", default=_env("out", "artifacts/model"), help="artifact directory to write")
    o.add_argument("--preset", default=_env("preset", "cpu"), help="measurement preset: cpu (full) or quick")
    o.add_argument("--variants", default=_env("variants", ""), help="comma-separated variant names (default: the preset's)")
    o.add_argument("--shapes", default=_env("shapes", ""), help="shapes to measure, e.g. b1xs16,b1xs128,b8xs128")
    o.add_argument("--target", default=_env("target", "b1xs128"), help="shape the selection optimises for")
    o.add_argument("--min-cosine", type=float, default=float(_env("min_cosine", 0.99)), help="embed: min cosine vs fp32")
    o.add_argument("--max-logit-diff", type=float, default=float(_env("max_logit_diff", 0.5)), help="classify: max |dlogit| vs fp32")
    o.add_argument("--iters", type=int, default=int(_env("iters", 0)), help="timed calls per variant and shape (default: preset)")
    o.add_argument("--threads", type=int, default=int(_env("threads", 0)), help="intra-op threads (0 = all cores)")
    o.add_argument("--max-length", type=int, default=int(_env("max_length", 0)), help="truncate texts to this many tokens")
    o.add_argument("--sample-texts", default=_env("sample_texts", ""), help="texts for fidelity checks (.txt lines or CSV 'text' column)")
    o.add_argument("--calibration-texts", default=_env("calibration_texts", ""), help="texts for static int8 calibration")

    i = sub.add_parser("info", help="show an artifact's recipe and measured figures")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print millis.json")

    r = sub.add_parser("predict", help="run an artifact on texts (arguments, or one per line on stdin with -)")
    r.add_argument("artifact")
    r.add_argument("texts", nargs="+")
    r.add_argument("--threads", type=int, default=int(_env("threads", 0)))
    return p


def _optimize(a) -> int:
    from dataclasses import replace

    from rich.console import Console

    from millis.config import PRESETS, Budget, OptimizeConfig, Shape
    from millis.optimize import optimize

    if a.preset not in PRESETS:
        raise MillisError(f"unknown preset {a.preset!r}; available: {', '.join(PRESETS)}")
    measure = PRESETS[a.preset]
    if a.shapes:
        measure = replace(measure, shapes=tuple(Shape.parse(s) for s in a.shapes.split(",")))
    if a.iters:
        measure = replace(measure, iters=a.iters)
    measure = replace(measure, threads=a.threads)
    cfg = OptimizeConfig(source=a.source, task=a.task, out=a.out, preset=a.preset, target=Shape.parse(a.target),
                         variants=tuple(v for v in a.variants.split(",") if v), max_length=a.max_length,
                         budget=Budget(min_cosine=a.min_cosine, max_logit_diff=a.max_logit_diff),
                         measure=measure, sample_texts=a.sample_texts, calibration_texts=a.calibration_texts)
    console = Console(stderr=True)
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            console.log(msg)
            status.update(msg)
        out = optimize(cfg, progress)
    print((out / "report.md").read_text())
    print(f"artifact: {out}")
    return 0


def _info(a) -> int:
    from millis.artifact import read_meta

    meta = read_meta(a.artifact)
    if a.json:
        print(json.dumps(meta, indent=2))
        return 0
    m = meta["measured"]
    print(f"artifact   {a.artifact} (format v{meta['version']}, millis {meta['millis_version']})")
    print(f"source     {meta['source']['spec']} ({meta['source']['model_type']}, sha256 {meta['source']['sha256'][:12]})")
    print(f"task       {meta['task']} -> {meta['output']}; max length {meta['max_length']}")
    v = meta["variant"]
    print(f"variant    {v['name']}: {v['runtime']} {v['precision']}, passes {' > '.join(v['passes']) or '-'}")
    for shape, s in m["latency"].items():
        print(f"  {shape:>10}  p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  ({s['n']} calls)")
    print(f"fidelity   {json.dumps({k: round(x, 6) for k, x in m['fidelity'].items()})}")
    print(f"hardware   {meta['hardware']['cpu']}, {meta['hardware']['cores']} cores, {' '.join(meta['hardware']['isa'])}")
    return 0


def _predict(a) -> int:
    from millis.api import load

    texts = [t for t in sys.stdin.read().splitlines() if t.strip()] if a.texts == ["-"] else a.texts
    model = load(a.artifact, threads=a.threads)
    if model.task == "classify":
        for t, p in zip(texts, model.predict(texts)):
            note = "  (truncated)" if p["truncated"] else ""
            print(json.dumps({"text": t, "label": p["label"], "score": round(p["score"], 4)}) + note)
    else:
        res = model.run(texts)
        for t, e, cut in zip(texts, res.outputs, res.truncated):
            print(json.dumps({"text": t, "dim": len(e), "embedding_head": [round(float(x), 4) for x in e[:4]],
                              "truncated": cut}))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"optimize": _optimize, "info": _info, "predict": _predict}[a.cmd](a)
    except MillisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

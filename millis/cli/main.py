"""`millis` command line: parses flags into a config and calls the stage's function. Nothing else."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from millis.cli.fit import FIT_COMMANDS, add_parsers, env
from millis.common.errors import MillisError


_env = env  # every flag can also come from MILLIS_<NAME>


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
    o.add_argument("--data", default=_env("data", ""), help="labelled CSV/TSV/JSONL: select on accuracy (classify)")
    o.add_argument("--max-drop", type=float, default=float(_env("max_drop", 0.5)),
                   help="with --data: accuracy points a variant may lose against fp32")
    o.add_argument("--text-col", default=_env("text_col", "text"), help="text column of --data / text files")
    o.add_argument("--label-col", default=_env("label_col", ""), help="label column of --data (default: as trained)")
    o.add_argument("--no-recover", action="store_true", default=_env("no_recover", "") not in ("", "0"),
                   help="do not try recovery recipes when plain int8 misses the budget")
    o.add_argument("--compress", nargs="?", const="default", default=_env("compress", ""),
                   help="also distil / prune smaller students and add them as candidates (preset: default, quick)")
    o.add_argument("--compress-data", default=_env("compress_data", ""),
                   help="what the students train on (default: the teacher's `millis train` file)")

    add_parsers(sub)  # train, distill, prune

    e = sub.add_parser("eval", help="accuracy / macro-F1 / per-class of a model or artifact on labelled data")
    e.add_argument("model", help="artifact dir, model dir from `millis train`, or a source spec")
    e.add_argument("--data", required=_env("data", None) is None, default=_env("data", None), help="labelled file")
    e.add_argument("--text-col", default=_env("text_col", "text"))
    e.add_argument("--label-col", default=_env("label_col", ""), help="default: the column the model was trained on")
    e.add_argument("--limit", type=int, default=int(_env("limit", 0)), help="first N rows only")
    e.add_argument("--threads", type=int, default=int(_env("threads", 0)))
    e.add_argument("--json", default=_env("json", ""), help="also write the full result to this JSON file")

    i = sub.add_parser("info", help="show an artifact's recipe and measured figures")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print millis.json")

    r = sub.add_parser("predict", help="run an artifact on texts (arguments, or one per line on stdin with -)")
    r.add_argument("artifact")
    r.add_argument("texts", nargs="+")
    r.add_argument("--threads", type=int, default=int(_env("threads", 0)))

    from millis.loadgen import BenchConfig
    from millis.serve.config import ServeConfig

    s = sub.add_parser("serve", help="serve an artifact (dynamic batching) or a decoder (OpenAI completions / chat) "
                                       "over HTTP; every flag also MILLIS_*")
    _config_flags(s, ServeConfig, positional="artifact")
    b = sub.add_parser("bench", help="load-test a running server: closed and open loop, p50/p90/p99, 429s")
    _config_flags(b, BenchConfig, positional="url")

    from millis.gen.config import GenerateConfig

    g = sub.add_parser("generate", help="continue a prompt with a decoder (HF Llama/Mistral/Qwen2/GPT-2 or llama2.c)")
    _config_flags(g, GenerateConfig, positional="model")
    return p


def _config_flags(p: argparse.ArgumentParser, cls, positional: str) -> None:
    """One flag per config field (help from the field), defaults from MILLIS_<FIELD> or the field."""
    from millis.common.config import flag_fields

    for f in flag_fields(cls):
        env = _env(f.name, None)
        helptext = f"{f.metadata['help']} [env MILLIS_{f.name.upper()}]"
        if f.name == positional:
            p.add_argument(f.name, nargs="?", default=env if env is not None else f.default, help=helptext)
        elif isinstance(f.default, bool):
            default = f.default if env is None else env.lower() not in ("", "0", "false", "no")
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=default,
                           help=helptext)
        else:
            typ = type(f.default)
            try:
                default = f.default if env is None else typ(env)
            except ValueError:
                raise SystemExit(f"error: MILLIS_{f.name.upper()}={env!r} is not a valid {typ.__name__}") from None
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=default, help=helptext)


def _config_of(cls, a):
    from millis.common.config import flag_fields

    return cls(**{f.name: getattr(a, f.name) for f in flag_fields(cls)})


def _optimize(a) -> int:
    from dataclasses import replace

    from rich.console import Console

    from millis.optimize.config import PRESETS, Budget, OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

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
                         budget=Budget(min_cosine=a.min_cosine, max_logit_diff=a.max_logit_diff, max_drop=a.max_drop),
                         measure=measure, sample_texts=a.sample_texts, calibration_texts=a.calibration_texts,
                         data=a.data, text_col=a.text_col, label_col=a.label_col, recover=not a.no_recover,
                         compress=a.compress, compress_data=a.compress_data)
    console = Console(stderr=True)
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            console.log(msg)
            status.update(msg)
        out = optimize(cfg, progress)
    print((out / "report.md").read_text())
    print(f"artifact: {out}")
    return 0


def _eval(a) -> int:
    from millis.evaluate.run import EvalConfig, evaluate

    res = evaluate(EvalConfig(model=a.model, data=a.data, text_col=a.text_col, label_col=a.label_col,
                              limit=a.limit, threads=a.threads))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    print(f"model {a.model} ({res['variant']}, {res['task']}) on {a.data}: {res['n']} rows, {res['seconds']:.1f} s")
    if res["task"] == "classify":
        print(f"accuracy {100 * res['accuracy']:.2f}%   macro-F1 {100 * res['macro_f1']:.2f}%\n")
        print(f"{'label':<40} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for label, m in res["per_class"].items():
            print(f"{label[:40]:<40} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8d}")
    else:
        print("agreement with fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                                                  if k in ("cos_min", "cos_mean", "nn_agreement", "top10_overlap")))
    return 0


def _info(a) -> int:
    from millis.artifact.store import read_meta

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
    mix = m.get("serve_mix")
    if mix:
        print(f"serve mix  {mix['rows_per_s']:.1f} rows/s over {len(mix['shapes'])} new shapes, cold then warm; "
              f"worst call {mix['worst_ms']:.0f} ms at {mix['worst_shape']}")
    print(f"fidelity   {json.dumps({k: round(x, 6) for k, x in m['fidelity'].items()})}")
    if m.get("accuracy"):
        print(f"accuracy   {100 * m['accuracy']['accuracy']:.2f}% on {meta['config']['data']} "
              f"(fp32 {100 * m['reference_accuracy']:.2f}%, budget -{meta['config']['budget']['max_drop']} pt)")
    c = meta.get("compressed")
    if c:
        print(f"compressed {c['recipe']['name']}: {c['layers']} layers, {c['heads']} heads, FFN {c['intermediate']} "
              f"(student {c['model']})")
    if v.get("keep_fp32"):
        print(f"kept fp32  {len(v['keep_fp32'])} node(s): {', '.join(v['keep_fp32'])}")
    print(f"hardware   {meta['hardware']['cpu']}, {meta['hardware']['cores']} cores, {' '.join(meta['hardware']['isa'])}")
    return 0


def _predict(a) -> int:
    from millis.artifact.model import load

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


def _serve(a) -> int:
    from millis.serve import ServeConfig, serve

    return serve(_config_of(ServeConfig, a))


def _bench(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from millis.loadgen import BenchConfig, bench

    cfg = _config_of(BenchConfig, a)
    console = Console()
    console.print(f"[bold]millis bench[/] {cfg.url}: {cfg.duration:g} s per level")

    def row(r: dict) -> None:
        console.print(f"  {r['load']:>8}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                      f"ok {r['ok']}  429 {r['rejected']}  errors {r['errors']}  timeouts {r['timeouts']}")

    res = bench(cfg, on_row=row)
    t = Table(title=f"{res['url']}{res['route']} ({res['model']})")
    for c in ("load", "req/s", "p50 ms", "p90 ms", "p99 ms", "ok", "429", "errors", "timeouts"):
        t.add_column(c, justify="right")
    for r in res["rows"]:
        t.add_row(r["load"], f"{r['rps']:.1f}", *(str(r[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "ok", "rejected",
                                                                       "errors", "timeouts")))
    console.print(t)
    console.print(f"wrote {Path(cfg.out) / 'bench.json'} and latency_vs_load.png")
    return 0


def _generate(a) -> int:
    from millis.gen import generate
    from millis.gen.config import GenerateConfig

    cfg = _config_of(GenerateConfig, a)

    def emit(text: str) -> None:
        print(text, end="", flush=True)

    if cfg.stream:
        emit(cfg.prompt)
    res = generate(cfg, on_text=emit if cfg.stream else None)
    print("" if cfg.stream else cfg.prompt + res.text)
    print(f"[{len(res.prompt_ids)} prompt + {len(res.token_ids)} new tokens, finished: {res.finished}; "
          f"load {res.load_s:.2f} s, prefill {res.prefill_ms:.1f} ms, decode {res.decode_ms_per_token:.2f} ms/token]",
          file=sys.stderr)
    return 0


COMMANDS = {"optimize": _optimize, **FIT_COMMANDS, "eval": _eval, "info": _info, "predict": _predict,
            "serve": _serve, "bench": _bench, "generate": _generate}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except MillisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

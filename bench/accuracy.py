"""Accuracy-aware selection on real data: fine-tuned MiniLM on Banking77 and SST-2.

    .venv/bin/python bench/accuracy.py [--datasets banking77,sst2] [--iters 200] [--out results.json]
                                       [--variants native-int8,native-int7]   # select among these only

Per dataset: `millis train` fine-tunes builtin:minilm (cached under bench/.cache/models, keyed by
the data's and the recipe's hash) and keeps the 10% of the training file it held out (seeded,
stratified) as the model's validation split. `millis optimize --max-drop 0.5` (no --data) then builds
every variant, judges each on every row of that validation split, runs recovery if plain int8 misses
the budget, and measures all of them interleaved in one run at b1 x (median token length of the
validation texts, rounded up to the bucket millis pads to). Selection never sees the test file: the
shipped artifact and the fp32 model are then scored on the whole test file by `millis eval`
(millis.evaluate). torch eager fp32 is one of the measured variants, so speed-ups are ratios taken in
the same run. Calibration texts are the training file's.
Writes bench/results/accuracy.json (`rows`: dataset, variant, val_accuracy, p50_ms, p99_ms,
speedup_vs_eager_rounds (eager's p50 / the variant's, round by round: median, min, max; the primary figure),
speedup_vs_eager (the pooled p50s' ratio), chosen; `summary`: the chosen variant's and fp32's test accuracy) and
prints a table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.common import hardware  # noqa: E402
from millis.optimize.config import Budget, MeasureConfig, OptimizeConfig
from millis.common.config import Shape, to_dict  # noqa: E402
from millis.encoder.source import inspect_dir, model_max_length  # noqa: E402
from millis.encoder.text import bucket_length  # noqa: E402

ANCHOR = "Optimum static INT8 DistilBERT on Banking77: -0.26 pt at 2.83x (published, 4-vCPU c6i; not rerun here)"


def data_root() -> Path:
    return Path(os.environ.get("MILLIS_DATA") or HERE.parent.parent / "shared" / "data")


# dataset -> (train file, test file, label column, training overrides)
DATASETS = {
    "banking77": ("banking77/train.csv", "banking77/test.csv", "category", {}),
    # 67k phrases: a 20k-row subset for 2 epochs keeps training near 10 minutes on 2 cores
    "sst2": ("sst2/train.tsv", "sst2/dev.tsv", "label", {"limit": 20000, "epochs": 2, "lr": 5e-5}),
}


def trained_model(name: str) -> tuple[Path, dict]:
    from millis.common.files import hash_files
    from millis.artifact.meta import read_train_meta
    from millis.artifact.validation import read_validation
    from millis.train.classify import train, train_config

    train_file, _, label_col, overrides = DATASETS[name]
    cfg = train_config("builtin:minilm", str(data_root() / train_file), label_col=label_col, **overrides)
    key = hashlib.sha256((hash_files([Path(cfg.data)]) + json.dumps({**to_dict(cfg), "data": "", "out": ""},
                                                                      sort_keys=True)).encode()).hexdigest()[:12]
    out = HERE / ".cache" / "models" / f"{name}-{key}"
    if read_train_meta(out) is None or read_validation(out) is None:  # trained before the split was kept: again
        t0 = time.perf_counter()

        def progress(event: str, f: dict) -> None:
            if event == "epoch":
                print(f"  [train {name}] epoch {f['epoch']}: loss {f['train_loss']:.4f}, "
                      f"val acc {100 * f['val_accuracy']:.2f}%, {f['seconds']:.0f} s", flush=True)
        train(replace(cfg, out=str(out)), progress)
        print(f"  [train {name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out, read_train_meta(out)


def median_bucket(model_dir: Path, texts: list[str]) -> tuple[float, Shape]:
    from transformers import AutoTokenizer

    lengths = [len(r) for r in AutoTokenizer.from_pretrained(str(model_dir))(texts)["input_ids"]]
    med = statistics.median(lengths)
    return med, Shape(1, bucket_length(math.ceil(med), model_max_length(inspect_dir(model_dir))))


def eval_scores(model: Path, test_file: Path, label_col: str) -> dict:
    """Accuracy and macro-F1 of a model dir or artifact on every row of the test file, the way
    `millis eval` computes them."""
    from millis.evaluate.run import EvalConfig, evaluate

    r = evaluate(EvalConfig(model=str(model), data=str(test_file), label_col=label_col))
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "n": r["n"]}


def run(name: str, iters: int, max_drop: float, variants: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    from millis.artifact.validation import read_validation
    from millis.optimize.pipeline import optimize

    train_file, test_file, label_col, _ = DATASETS[name]
    model_dir, tmeta = trained_model(name)
    val = read_validation(model_dir)  # the rows training held out: all that selection sees
    med, shape = median_bucket(model_dir, list(val.texts))
    out = HERE / ".cache" / "artifacts" / name
    cfg = OptimizeConfig(source=str(model_dir), task="classify", out=str(out), target=shape,
                         calibration_texts=str(data_root() / train_file), budget=Budget(max_drop=max_drop),
                         measure=MeasureConfig(shapes=(shape,), warmup=20, iters=iters, rounds=5), variants=variants)
    t0 = time.perf_counter()
    optimize(cfg, progress=lambda m: print(f"  [optimize {name}] {m}", flush=True))
    seconds = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())
    eager_lat = next(v for v in rep["variants"] if v["name"] == "torch-fp32")["latency"][shape.name]
    eager = eager_lat["p50_ms"]
    rows = []
    for v in rep["variants"]:
        if shape.name not in v["latency"]:
            continue
        lat = v["latency"][shape.name]
        rows.append({"dataset": name, "variant": v["name"], "val_accuracy": v["accuracy"]["accuracy"],
                     "val_drop_pts": v["accuracy"]["drop_pts"], "val_macro_f1": v["accuracy"]["macro_f1"],
                     "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "speedup_vs_eager": eager / lat["p50_ms"],
                     "speedup_vs_eager_rounds": rounds_speedup(eager_lat, lat),
                     "within_budget": v["ok"], "recovery": v.get("recovery", ""), "chosen": v["name"] == rep["chosen"]})
    best = next(r for r in rows if r["chosen"])
    ref = next(r for r in rows if r["variant"] == "torch-fp32")
    print(f"  [eval {name}] fp32 and {best['variant']} on {test_file}", flush=True)
    test_fp32 = eval_scores(model_dir, data_root() / test_file, label_col)
    test_chosen = eval_scores(out, data_root() / test_file, label_col)
    summary = {"dataset": name, "selection": rep["measured"]["selection_data"], "val_rows": len(val),
               "median_tokens": med, "shape": shape.name, "chosen": best["variant"],
               "fp32_val_accuracy": ref["val_accuracy"], "chosen_val_accuracy": best["val_accuracy"],
               "val_drop_pts": best["val_drop_pts"], "test_file": test_file, "test_rows": test_chosen["n"],
               "fp32_test_accuracy": test_fp32["accuracy"], "chosen_test_accuracy": test_chosen["accuracy"],
               "test_drop_pts": 100 * (test_fp32["accuracy"] - test_chosen["accuracy"]),
               "fp32_test_macro_f1": test_fp32["macro_f1"], "chosen_test_macro_f1": test_chosen["macro_f1"],
               "speedup_vs_eager": best["speedup_vs_eager"],
               "speedup_vs_eager_rounds": best["speedup_vs_eager_rounds"],
               "train": {"dir": model_dir.name, "best_epoch": tmeta.best_epoch, "val_accuracy": tmeta.val_accuracy,
                         "train_s": tmeta.train_s, "config": tmeta.config},
               "recovery": {k: rep["recovery"].get(k) for k in ("needed", "why", "attempts", "kept_fp32")},
               "optimize_s": seconds}
    return rows, summary


def rounds_speedup(eager: dict, lat: dict) -> dict | None:
    """eager's p50 / this variant's, round by round (optimize times the variants interleaved: a slow spell hits
    both sides of a round): the median and range, the primary figure; speedup_vs_eager (the pooled p50s' ratio)
    stays beside it. None when the report has no per-round p50s."""
    from millis.optimize.measure import paired_ratio

    got = paired_ratio(eager.get("round_p50_ms") or [], lat.get("round_p50_ms") or [])
    return None if got is None else dict(zip(("median", "min", "max"), (round(float(x), 4) for x in got)))


def fmt_speedup(r: dict) -> str:
    """The per-round median [range] where there is one, else the pooled ratio (marked)."""
    x = r.get("speedup_vs_eager_rounds")
    return f"{x['median']:.2f} [{x['min']:.2f}-{x['max']:.2f}]" if x else f"{r['speedup_vs_eager']:.2f} (pooled)"


def selection_texts(n: int = 512, seed: int = 0) -> Path:
    """A seeded sample of `n` Banking77 training texts, none of them (case and spaces aside) in test.csv,
    one per line: what the embedder benches apply the cosine budget to, so that the budget never sees the
    texts they report on."""
    import random

    from millis.common.readers import read_column

    root = data_root() / "banking77"
    reported = {t.strip().lower() for t in read_column(root / "test.csv", "text")}
    pool = [t for t in read_column(root / "train.csv", "text")
            if t.strip().lower() not in reported and t.splitlines() == [t]]  # one text, one line
    out = HERE / ".cache" / f"banking77-train-sample-{n}-seed{seed}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(random.Random(seed).sample(pool, n)) + "\n")
    return out


def embed_recovery(iters: int, min_cosine: float) -> dict:
    """The real all-MiniLM-L6-v2 embedder at a cosine budget plain int8 misses (0.92 on Banking77):
    shows recovery and the sensitivity fallback on real weights. Gate: cosine min vs fp32 on 512
    seeded Banking77 training texts (`selection_texts`); calibration and sensitivity on training texts;
    the chosen artifact's agreement with fp32 is then reported on every test.csv text by `millis eval`."""
    from millis.evaluate.run import EvalConfig, evaluate
    from millis.optimize.pipeline import optimize

    root = data_root() / "banking77"
    out = HERE / ".cache" / "artifacts" / "minilm-embed"
    shape = Shape(1, 16)
    cfg = OptimizeConfig(source="builtin:minilm", task="embed", out=str(out), target=shape,
                         sample_texts=str(selection_texts()), calibration_texts=str(root / "train.csv"),
                         budget=Budget(min_cosine=min_cosine),
                         measure=MeasureConfig(shapes=(shape,), warmup=20, iters=iters, rounds=5))
    optimize(cfg, progress=lambda m: print(f"  [optimize minilm-embed] {m}", flush=True))
    rep = json.loads((out / "report.json").read_text())
    eager_lat = next(v for v in rep["variants"] if v["name"] == "torch-fp32")["latency"][shape.name]
    eager = eager_lat["p50_ms"]
    rows = [{"variant": v["name"], "sel_cos_min": v["fidelity"]["cos_min"],
             "sel_nn_agreement": v["fidelity"].get("nn_agreement"),
             "p50_ms": v["latency"][shape.name]["p50_ms"], "p99_ms": v["latency"][shape.name]["p99_ms"],
             "speedup_vs_eager": eager / v["latency"][shape.name]["p50_ms"],
             "speedup_vs_eager_rounds": rounds_speedup(eager_lat, v["latency"][shape.name]), "within_budget": v["ok"],
             "recovery": v.get("recovery", ""), "chosen": v["name"] == rep["chosen"]}
            for v in rep["variants"] if shape.name in v["latency"]]
    test = evaluate(EvalConfig(model=str(out), data=str(root / "test.csv")))
    return {"model": "builtin:minilm (embed)", "shape": shape.name, "min_cosine": min_cosine, "chosen": rep["chosen"],
            "selection_texts": rep["measured"]["fidelity_texts"],
            "test": {k: test[k] for k in test if k in ("n", "cos_min", "cos_mean", "nn_agreement", "top10_overlap")},
            "rows": rows, "recovery": rep["recovery"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="banking77,sst2")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--embed-min-cosine", type=float, default=0.995, help="0 skips the embedder recovery run")
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    ap.add_argument("--variants", default="", help="comma-separated: select among these only (default: the catalog)")
    a = ap.parse_args()
    rows, summaries = [], []
    for name in a.datasets.split(","):
        r, s = run(name, a.iters, a.max_drop, tuple(v for v in a.variants.split(",") if v))
        rows += r
        summaries.append(s)
    print("\nselection on the validation split each model kept (accuracy and drop: validation rows)")
    print("x eager: the median of per-round ratios [their range]; the pooled p50s' ratio beside it")
    print(f"{'dataset':<10} {'variant':<28} {'val acc %':>9} {'drop pt':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'x eager (rounds)':>18} {'pooled':>7}")
    for r in rows:
        mark = "  <- chosen" if r["chosen"] else ("" if r["within_budget"] else "  (not selectable: see report.md)")
        print(f"{r['dataset']:<10} {r['variant']:<28} {100 * r['val_accuracy']:>9.2f} {r['val_drop_pts']:>8.2f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {fmt_speedup(r):>18} {r['speedup_vs_eager']:>7.2f}{mark}")
    for s in summaries:
        print(f"{s['dataset']}: chosen {s['chosen']} on {s['val_rows']} validation rows; on {s['test_file']} "
              f"({s['test_rows']} rows, unseen by selection): fp32 {100 * s['fp32_test_accuracy']:.2f}%, chosen "
              f"{100 * s['chosen_test_accuracy']:.2f}% ({-s['test_drop_pts']:+.2f} pt), "
              f"{fmt_speedup(s)}x eager at {s['shape']} (median {s['median_tokens']} tokens; pooled p50s "
              f"{s['speedup_vs_eager']:.2f}x)")
    print(f"anchor: {ANCHOR}")
    embed = embed_recovery(a.iters, a.embed_min_cosine) if a.embed_min_cosine else None
    if embed:
        print(f"\nminilm embed, cosine budget {a.embed_min_cosine} (recovery: {embed['recovery']['why']})")
        for r in embed["rows"]:
            print(f"  {r['variant']:<28} cos min {r['sel_cos_min']:.4f} (selection texts)  p50 {r['p50_ms']:6.2f} ms  "
                  f"{fmt_speedup(r)}x eager{'  <- chosen' if r['chosen'] else ''}")
        t = embed["test"]
        print(f"  chosen on {t['n']} test texts (millis eval): cos min {t['cos_min']:.4f}, mean {t['cos_mean']:.4f}, "
              f"nn agreement {t.get('nn_agreement', float('nan')):.3f}")
        for k in embed["recovery"].get("kept_fp32", []):
            print(f"  kept fp32: {k['node']} (error {k['error']:.2e})")
    res = {"meta": {"command": "python bench/accuracy.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                    "hardware": hardware.describe(), "max_drop": a.max_drop, "anchor": ANCHOR},
           "summary": summaries, "rows": rows, "embed_recovery": embed}
    from checkouts import write_result  # bench/, on the path as this script's own folder

    write_result(a.out, res, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

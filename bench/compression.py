"""Compression that keeps accuracy: distilled and pruned MiniLM students on Banking77.

    .venv/bin/python bench/compression.py [--iters 300] [--max-drop 1.0] [--compress default]

The teacher is builtin:minilm fine-tuned on Banking77's train.csv (`millis train`, cached by
bench/accuracy.py), which keeps the 10% of train.csv it held out as its validation split.
`millis optimize --compress` (no --data) then distils / prunes the preset's students on the same
training rows, holding out the same validation rows (cached under bench/.cache/mcache, so a rerun
only measures), builds every variant of the teacher and of each student, judges each on every row
of the validation split and measures all of them interleaved in one run at b1 x the validation
texts' median length (rounded up to millis's bucket). Selection never sees test.csv: the shipped
artifact, the fp32 teacher and each fp32 student are then scored on all of it by `millis eval`.
torch eager fp32 of the full teacher is one of the measured variants, so speed-ups are ratios taken
in the same run. Writes bench/results/compression.json (`rows`: variant, layers, heads,
val_accuracy, p50_ms, p99_ms, speedup_vs_eager, chosen; `students`: training cost and fp32 test
accuracy; `summary`: test accuracy of the teacher and the chosen variant), a table, and the
optimize report's Pareto plot (validation accuracy) as bench/results/compression_pareto.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("MILLIS_CACHE", str(HERE / ".cache" / "mcache"))  # trained students live here

from accuracy import data_root, eval_scores, median_bucket, trained_model  # noqa: E402

from millis.common import hardware  # noqa: E402
from millis.optimize.config import Budget, MeasureConfig, OptimizeConfig  # noqa: E402


def main() -> int:
    from millis.artifact.validation import read_validation
    from millis.optimize.pipeline import optimize
    from millis.artifact.meta import read_train_meta

    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--compress", default="default")
    a = ap.parse_args()
    teacher, tmeta = trained_model("banking77")
    root = data_root() / "banking77"
    val = read_validation(teacher)  # the rows training held out: all that selection sees
    med, shape = median_bucket(teacher, list(val.texts))
    out = HERE / ".cache" / "artifacts" / "banking77-compressed"
    cfg = OptimizeConfig(source=str(teacher), task="classify", out=str(out), target=shape,
                         calibration_texts=str(root / "train.csv"),
                         budget=Budget(max_drop=a.max_drop), compress=a.compress,
                         measure=MeasureConfig(shapes=(shape,), warmup=20, iters=a.iters, rounds=5))
    t0 = time.perf_counter()
    optimize(cfg, progress=lambda m: print(f"  [optimize] {m}", flush=True))
    seconds = time.perf_counter() - t0
    rep = json.loads((out / "report.json").read_text())
    teacher_layers, teacher_heads = rep["source"]["layers"], rep["source"]["heads"]
    eager = next(v for v in rep["variants"] if v["name"] == "torch-fp32")["latency"][shape.name]["p50_ms"]
    rows, students = [], {}
    for v in rep["variants"]:
        if shape.name not in v["latency"]:
            continue
        c = v["recipe"].get("compressed")
        lat = v["latency"][shape.name]
        rows.append({"variant": v["name"], "layers": c["layers"] if c else teacher_layers,
                     "heads": c["heads"] if c else teacher_heads, "precision": v["precision"],
                     "val_accuracy": v["accuracy"]["accuracy"], "val_drop_pts": v["accuracy"]["drop_pts"],
                     "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"], "speedup_vs_eager": eager / lat["p50_ms"],
                     "within_budget": v["ok"], "chosen": v["name"] == rep["chosen"]})
        if c and c["recipe"]["name"] not in students:
            students[c["recipe"]["name"]] = _student(c, read_train_meta)
            print(f"  [eval] student {c['recipe']['name']} (fp32) on test.csv", flush=True)
            students[c["recipe"]["name"]]["fp32_test"] = eval_scores(Path(c["model"]), root / "test.csv", "category")
    ref = next(r for r in rows if r["variant"] == "torch-fp32")
    best = next(r for r in rows if r["chosen"])
    print(f"  [eval] teacher (fp32) and {best['variant']} on test.csv", flush=True)
    test_teacher = eval_scores(teacher, root / "test.csv", "category")
    test_chosen = eval_scores(out, root / "test.csv", "category")
    summary = {"selection": rep["measured"]["selection_data"], "val_rows": len(val), "median_tokens": med,
               "shape": shape.name, "teacher_val_accuracy": ref["val_accuracy"], "chosen": best["variant"],
               "chosen_val_accuracy": best["val_accuracy"], "chosen_val_drop_pts": best["val_drop_pts"],
               "test_rows": test_chosen["n"], "teacher_test_accuracy": test_teacher["accuracy"],
               "chosen_test_accuracy": test_chosen["accuracy"],
               "chosen_test_drop_pts": 100 * (test_teacher["accuracy"] - test_chosen["accuracy"]),
               "chosen_speedup_vs_eager": best["speedup_vs_eager"], "max_drop": a.max_drop,
               "teacher_train_s": tmeta.train_s, "optimize_s": seconds,
               # every training run once (students share their distillation step)
               "students_train_minutes": sum({x["dir"]: x["train_s"] for st in students.values()
                                              for x in st["steps"]}.values()) / 60}
    half = next((r for r in rows
                 if r["variant"].startswith("l-half+") and r["variant"].endswith("ort-fp32-fused")), None)
    if half:
        summary["l_half_fp32_val_accuracy"] = half["val_accuracy"]
        summary["l_half_fp32_val_drop_pts"] = half["val_drop_pts"]
    _print(rows, students, summary)
    res = {"meta": {"command": "python bench/compression.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"), "hardware": hardware.describe(),
                    "teacher": {"dir": teacher.name, "config": tmeta.config, "val_accuracy": tmeta.val_accuracy}},
           "summary": summary, "students": students, "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "compression.json").write_text(json.dumps(res, indent=2))
    shutil.copy2(out / "pareto.png", HERE / "results" / "compression_pareto.png")  # students among the rest
    print(f"wrote {HERE / 'results' / 'compression.json'} and compression_pareto.png")
    return 0


def _student(c: dict, read_train_meta) -> dict:
    """How a student was made and what it cost: its own training plus that of the model it came from."""
    chain, d = [], Path(c["model"])
    while (m := read_train_meta(d)) is not None and (m.distill or m.prune):
        chain.append({"step": "distill" if m.distill else "prune", "dir": d.name, "train_s": m.train_s,
                      "best_epoch": m.best_epoch, "epochs_run": len(m.history), "val_accuracy": m.val_accuracy})
        d = Path(m.source.spec)
    return {"recipe": c["recipe"], "layers": c["layers"], "heads": c["heads"], "intermediate": c["intermediate"],
            "steps": chain[::-1], "train_minutes": sum(s["train_s"] for s in chain) / 60}  # incl. shared steps


def _print(rows: list[dict], students: dict, s: dict) -> None:
    print(f"\nselection on {s['val_rows']} validation rows the teacher kept (accuracy and drop: those rows)")
    print(f"{'variant':<34} {'layers':>6} {'heads':>5} {'val acc %':>9} {'drop pt':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'x eager':>8}")
    for r in sorted(rows, key=lambda r: r["p50_ms"]):
        mark = "  <- chosen" if r["chosen"] else ("" if r["within_budget"] else "  (not selectable: see report.md)")
        print(f"{r['variant']:<34} {r['layers']:>6} {r['heads']:>5} {100 * r['val_accuracy']:>9.2f} "
              f"{r['val_drop_pts']:>8.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['speedup_vs_eager']:>8.2f}{mark}")
    for name, st in students.items():
        steps = " then ".join(f"{x['step']} ({x['train_s'] / 60:.1f} min, {x['epochs_run']} epochs)"
                              for x in st["steps"])
        print(f"student {name}: {st['layers']} layers, {st['heads']} heads, FFN {st['intermediate']}: {steps}; "
              f"fp32 on test.csv {100 * st['fp32_test']['accuracy']:.2f}%")
    print(f"on test.csv ({s['test_rows']} rows, unseen by selection): "
          f"teacher fp32 {100 * s['teacher_test_accuracy']:.2f}%, "
          f"chosen {s['chosen']} {100 * s['chosen_test_accuracy']:.2f}% ({-s['chosen_test_drop_pts']:+.2f} pt), "
          f"{s['chosen_speedup_vs_eager']:.2f}x eager at {s['shape']} (median {s['median_tokens']} validation tokens); "
          f"all students' training took {s['students_train_minutes']:.1f} min")


if __name__ == "__main__":
    sys.exit(main())

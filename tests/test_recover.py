"""Recovery when plain int8 misses the budget: keep-k schedule, fp32 fallback in the graph, end to end."""
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from millis.optimize.build import quantize
from millis.optimize.recover import error, keep_counts
from millis.encoder.source import resolve
from millis.optimize.build.variants import CATALOG, RECOVERY, Builder

QUANT_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "MatMulIntegerToFloat")


def test_keep_counts():
    assert keep_counts(0) == keep_counts(1) == []
    assert keep_counts(2) == [1]
    assert keep_counts(5) == [1, 2, 3, 4]
    assert keep_counts(20) == [1, 2, 3, 4, 6, 9, 13, 19]  # +1 up to 4, then x1.5; always below n


def test_error_is_scale_free():
    ref = np.random.default_rng(0).normal(size=(8, 3))
    assert error(ref, ref) == 0.0
    assert error(ref, ref + 0.1) == pytest.approx(error(10 * ref, 10 * (ref + 0.1)))
    assert error(ref, ref + 0.2) > error(ref, ref + 0.1)



def _result(name: str, ok: bool, error: str = "", reason: str = ""):
    from millis.optimize.judge import VariantResult

    return VariantResult(name, "onnxruntime", "int8", "", {}, ok=ok, error=error,
                         reason=reason or ("within budget" if ok else "accuracy drop 2.00 pt exceeds --max-drop 0.5"),
                         accuracy={"accuracy": 0.9 if ok else 0.88})


class FakeJudge:
    """Judges by a table: variant name (or, for mixed tries, the number of nodes kept) -> ok."""

    def __init__(self, ok: dict):
        self.ok, self.calls = ok, []

    def __call__(self, v, *, recovery: str = "", builder=None, compressed=None):
        from millis.optimize.judge import Judged

        self.calls.append((v.name, len(v.keep_fp32), recovery))
        ok = self.ok.get(len(v.keep_fp32) if v.keep_fp32 else v.name, False)
        r = _result(v.name, ok)
        r.recovery = recovery
        return Judged(r, Path(f"built/{v.name}-{len(v.keep_fp32)}"), runtime=object())


def test_recover_only_when_plain_int8_misses():
    from millis.optimize.recover import recover

    def nothing(*a, **k):
        raise AssertionError("recovery must not judge or rank anything here")

    assert recover({}, nothing, nothing, []).log == {"needed": False, "why": "plain int8 was not built", "attempts": []}
    within = recover({"ort-int8-dynamic": _result("ort-int8-dynamic", True)}, nothing, nothing, [])
    assert within.log["why"] == "plain int8 is within budget" and within.judged == []
    failed = {"ort-int8-dynamic": _result("ort-int8-dynamic", False, "RuntimeError: x", "build or run failed")}
    assert recover(failed, nothing, nothing, []).log["needed"] is False


def test_recover_returns_the_recipes_it_judged_and_skips_the_fallback_when_one_is_within():
    from millis.optimize.recover import recover

    judge = FakeJudge({"ort-int8-dynamic-pc": True})
    already = {"ort-int8-dynamic": _result("ort-int8-dynamic", False),
               "ort-int8-static": _result("ort-int8-static", False)}  # in the preset: judged before, not again

    def rank(*a):
        raise AssertionError("per-channel is within budget: no sensitivity analysis")

    rec = recover(already, judge, rank, ["t"] * 3)
    assert [c[0] for c in judge.calls] == ["ort-int8-dynamic-pc", "ort-int8-static-percentile",
                                           "ort-int8-static-entropy"]
    assert [j.name for j in rec.judged] == [c[0] for c in judge.calls]  # returned, with their dirs and runtimes
    assert all(j.dir is not None and j.runtime is not None for j in rec.judged)
    assert all(j.result.recovery == "int8 recipe" for j in rec.judged)
    assert [(a["variant"], a["ok"]) for a in rec.log["attempts"]] == [
        ("ort-int8-dynamic-pc", True), ("ort-int8-static", False), ("ort-int8-static-percentile", False),
        ("ort-int8-static-entropy", False)]
    assert "sensitivity" not in rec.log


def test_recover_keeps_only_the_mixed_variant_that_meets_the_budget():
    from millis.optimize.recover import MIXED, recover

    judge = FakeJudge({3: True})  # keeping 3 nodes in fp32 is the first that passes
    ranked = [(f"n{i}", 1.0 / (i + 1)) for i in range(8)]
    seen = []

    def rank(base, texts):
        seen.append((base.name, len(texts)))
        return ranked

    rec = recover({"ort-int8-dynamic": _result("ort-int8-dynamic", False)}, judge, rank, ["t"] * 300)
    assert seen == [("ort-int8-dynamic-pc", 256)]  # SENSITIVITY_TEXTS of the calibration texts
    mixed_calls = [c for c in judge.calls if c[0] == MIXED]
    assert [c[1] for c in mixed_calls] == [1, 2, 3] and all(c[2] == "sensitivity fallback" for c in mixed_calls)
    # the 4 recipes, then only the passing mixed try: the failed tries are in the log, not measured
    assert [j.name for j in rec.judged] == list(RECOVERY) + [MIXED]
    assert rec.judged[-1].dir == Path(f"built/{MIXED}-3") and rec.judged[-1].result.ok
    assert [a["ok"] for a in rec.log["attempts"][4:]] == [False, False, True]
    assert [k["node"] for k in rec.log["kept_fp32"]] == ["n0", "n1", "n2"]


def test_recovery_and_compression_use_no_evaluator_fields():
    """They get a judge function and return judged candidates: no shared evaluator, no build dir in facts."""
    import re
    from pathlib import Path as P

    root = P(__file__).resolve().parent.parent / "millis" / "optimize"
    for f in ("recover.py", "compress.py", "pipeline.py", "judge.py"):
        text = (root / f).read_text()
        assert not re.search(r"VariantEvaluator|\bev\.|\bref_out\b|\bref_acc\b|\.results\[|facts\[.dir.\]", text), f


def test_report_lists_the_nodes_kept_in_fp32():
    from millis.optimize.report import recovery_lines

    rec = {"needed": True, "why": "ort-int8-dynamic: accuracy drop 2.00 pt exceeds --max-drop 0.5",
           "attempts": [{"step": "keep 1 node(s) fp32", "variant": "ort-int8-mixed", "ok": True,
                         "reason": "accuracy drop 0.20 pt within --max-drop 0.5"}],
           "sensitivity": [{"node": "/hf/classifier/Gemm_MatMul", "error": 0.25},
                           {"node": "Attention_0", "error": 0.01}],
           "kept_fp32": [{"node": "/hf/classifier/Gemm_MatMul", "error": 0.25, "why": "rank 1 of 2"}]}
    md = "\n".join(recovery_lines(rec))
    assert "## Recovery" in md and "| keep 1 node(s) fp32 | ort-int8-mixed | yes |" in md
    assert "Nodes kept in fp32 by `ort-int8-mixed` (1 of 2" in md
    assert "| `/hf/classifier/Gemm_MatMul` | 2.500e-01 | rank 1 of 2 |" in md
    assert "Attention_0" not in md
    assert recovery_lines({"needed": False, "why": "disabled", "attempts": []})[1] == "Recovery: not needed (disabled)."

@pytest.fixture(scope="module")
def builder(tmp_path_factory, tiny_dirs):
    return Builder(resolve("tiny:bert"), "classify", tmp_path_factory.mktemp("b"), lambda: [])


def _float_weight(m: onnx.ModelProto, name: str) -> bool:
    init = next(i for i in m.graph.initializer if i.name == name)
    return init.data_type == onnx.TensorProto.FLOAT


def test_quantizable_nodes_include_the_gemm_heads(builder):
    nodes = quantize.quantizable_nodes(builder.graph(("export", "fuse")))
    assert sum(n.startswith("Attention") for n in nodes) == 2  # two layers, fused QKV
    assert sum(n.endswith("dense/MatMul") for n in nodes) == 6  # attention output, FFN in and out
    # the pooler and classifier Gemms, which dynamic int8 rewrites into MatMuls and quantizes
    assert "/hf/classifier/Gemm_MatMul" in nodes and "/hf/bert/pooler/dense/Gemm_MatMul" in nodes
    plain, _ = builder.build(CATALOG["ort-int8-dynamic-pc"])
    ops = [n.op_type for n in onnx.load(str(plain / "model.onnx")).graph.node]
    assert sum(ops.count(o) for o in QUANT_OPS) == len(nodes)  # every listed node is what int8 touches


def test_keep_fp32_leaves_named_nodes_float(builder):
    fused = builder.graph(("export", "fuse"))
    nodes = quantize.quantizable_nodes(fused)
    mm = next(n for n in nodes if n.endswith("intermediate/dense/MatMul"))
    head = "/hf/classifier/Gemm_MatMul"
    keep = (mm, head)
    vdir, facts = builder.build(replace(CATALOG["ort-int8-dynamic-pc"], name="x", keep_fp32=keep))
    m = onnx.load(str(vdir / "model.onnx"))
    by_name = {n.name: n for n in m.graph.node}
    for k in keep:
        assert by_name[k].op_type == "MatMul", k
        assert _float_weight(m, by_name[k].input[1]), k
    # every other quantizable node is int8: none is left as a float MatMul / Attention
    others = [n for n in nodes if n not in keep]
    assert not any(n in by_name and by_name[n].op_type in ("MatMul", "Attention") for n in others)
    assert sum(facts["ops"].get(o, 0) for o in QUANT_OPS) == len(others)
    assert facts["ops"].get("MatMul") == 2
    # the plain per-channel build quantizes the same node
    plain, _ = builder.build(CATALOG["ort-int8-dynamic-pc"])
    assert mm not in {n.name for n in onnx.load(str(plain / "model.onnx")).graph.node}


def test_keep_fp32_needs_a_dynamic_pass(builder):
    from millis.common.errors import MillisError

    with pytest.raises(MillisError, match="needs a dynamic int8 pass"):
        builder.build(replace(CATALOG["ort-int8-static"], name="y", keep_fp32=("Attention_0",)))


@pytest.mark.slow
def test_optimize_recovers_when_plain_int8_misses(tmp_path, tiny_dirs, quick_measure):
    """max_drop -1: only a gain of one point would pass, so plain int8 always misses and every
    recovery step runs; nothing passes, so the reference ships."""
    from millis.optimize.config import Budget, OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize
    from millis.common.samples import sample_texts

    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i, t in enumerate(sample_texts()[:40]):
            w.writerow([t, ("negative", "neutral", "positive")[i % 3]])
    cfg = OptimizeConfig(source="tiny:bert", task="classify", out=str(tmp_path / "art"), data=str(data),
                         variants=("ort-int8-dynamic",), target=Shape(1, 16), budget=Budget(max_drop=-1.0),
                         measure=replace(quick_measure, threads=1))
    out = optimize(cfg)
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["needed"] and rec["why"].startswith("ort-int8-dynamic: accuracy drop")
    steps = [a["step"] for a in rec["attempts"]]
    assert steps[:4] == ["per-channel weights"] + ["static calibration"] * 3
    assert [a["variant"] for a in rec["attempts"][:4]] == ["ort-int8-dynamic-pc", "ort-int8-static",
                                                           "ort-int8-static-percentile", "ort-int8-static-entropy"]
    n = len(rec["sensitivity"])
    assert n == 10 and all(s["error"] >= 0 for s in rec["sensitivity"])
    assert [s["error"] for s in rec["sensitivity"]] == sorted((s["error"] for s in rec["sensitivity"]), reverse=True)
    assert steps[4:] == [f"keep {k} node(s) fp32" for k in keep_counts(n)]
    assert not any(a["ok"] for a in rec["attempts"]) and "kept_fp32" not in rec
    assert all(a["accuracy"] is not None for a in rec["attempts"])
    assert report["chosen"] == "torch-fp32"
    assert report["measured"]["reference_accuracy"] is not None
    md = (out / "report.md").read_text()
    assert "## Recovery" in md and "| keep 1 node(s) fp32 | ort-int8-mixed | no |" in md
    assert "no node set within budget" in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "pareto.png" in json.loads((out / "millis.json").read_text())["files"]

"""Recovery when plain int8 misses the budget: keep-k schedule, fp32 fallback in the graph, end to end."""
import csv
import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from millis.optimize.build import quantize
from millis.optimize.recover import error, keep_counts
from millis.encoder.source import resolve
from millis.optimize.build.variants import CATALOG, Builder

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



def test_recover_only_when_plain_int8_misses():
    from types import SimpleNamespace

    from millis.optimize.recover import recover

    ev = SimpleNamespace(results={})
    assert recover(ev, []) == {"needed": False, "why": "plain int8 was not built", "attempts": []}
    ev.results["ort-int8-dynamic"] = SimpleNamespace(ok=True, error="", reason="within budget")
    assert recover(ev, [])["why"] == "plain int8 is within budget"
    ev.results["ort-int8-dynamic"] = SimpleNamespace(ok=False, error="RuntimeError: x", reason="build or run failed")
    assert recover(ev, [])["needed"] is False


def test_report_lists_the_nodes_kept_in_fp32():
    from millis.optimize.report import recovery_lines

    rec = {"needed": True, "why": "ort-int8-dynamic: accuracy drop 2.00 pt exceeds --max-drop 0.5",
           "attempts": [{"step": "keep 1 node(s) fp32", "variant": "ort-int8-mixed", "ok": True,
                         "reason": "accuracy drop 0.20 pt within --max-drop 0.5"}],
           "sensitivity": [{"node": "/hf/classifier/Gemm_MatMul", "error": 0.25}, {"node": "Attention_0", "error": 0.01}],
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

"""Recovery when plain INT8 misses the budget: other int8 recipes, then sensitivity-driven fallback.

Order: per-channel weights, static calibration (MinMax, percentile, entropy), and, when no dynamic
recipe is within budget, per-node sensitivity: each quantizable MatMul / Attention is quantized
alone and its output error against fp32 is measured on calibration texts (never the evaluation
data); the most harmful nodes are then kept in higher precision, k = 1, 2, 3, 4, 6, 9, 13... until the
variant is within budget. Higher precision is fp32 here: ONNX Runtime's CPU kernels have no bf16
MatMul, and this also holds on AMX machines, so bf16 fallback would need another runtime.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from millis.optimize.build import quantize
from millis.optimize.judge import VariantEvaluator
from millis.runtimes import open_runtime
from millis.encoder.tasks import OUTPUT_NAME
from millis.optimize.build.variants import CATALOG, DYNAMIC_INT8, MIXED_BASE, RECOVERY, Variant

PLAIN_INT8 = "ort-int8-dynamic"
SENSITIVITY_TEXTS = 256
MIXED = "ort-int8-mixed"


def keep_counts(n: int) -> list[int]:
    """How many nodes to keep in fp32 at each try: 1, 2, 3, 4, then x1.5 (6, 9, 13...) below n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k = k + 1 if k < 4 else int(k * 1.5)
    return ks


def error(ref: np.ndarray, out: np.ndarray) -> float:
    """Scale-free output error: mean squared difference over the reference's variance."""
    return float(np.mean((ref - out) ** 2) / max(float(np.var(ref)), 1e-12))


def sensitivity(ev: VariantEvaluator, base: Variant, texts: list[str]) -> list[tuple[str, float]]:
    """[(node, error when only that node is int8)], most harmful first."""
    fused = ev.builder.graph(base.passes[:-1])  # the fp32 graph the int8 pass starts from
    args = {k: v for k, v in DYNAMIC_INT8[base.passes[-1]].items() if k != "op_types"}
    nodes = quantize.quantizable_nodes(fused)
    out_name, threads = OUTPUT_NAME[ev.cfg.task], ev.cfg.measure.threads
    opts = {"graph_level": "all", "task": ev.cfg.task}
    ref = ev.outputs(open_runtime("onnxruntime", fused.parent, "fp32", ev.src.input_names, out_name,
                                  dict(opts, file=fused.name), threads), texts)
    tmp = Path(tempfile.mkdtemp(prefix="millis-sens-"))
    scores = []
    try:
        for i, node in enumerate(nodes):
            ev.progress(f"sensitivity {i + 1}/{len(nodes)}: {node}")
            path = tmp / "model.onnx"
            quantize.dynamic(fused, path, only=(node,), **args)
            rt = open_runtime("onnxruntime", tmp, node, ev.src.input_names, out_name, opts, threads)
            scores.append((node, error(ref, ev.outputs(rt, texts))))
            del rt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(scores, key=lambda s: -s[1])


def recover(ev: VariantEvaluator, calibration_texts: list[str]) -> dict[str, Any]:
    """Run recovery if plain int8 is over budget; return the log the report shows."""
    plain = ev.results.get(PLAIN_INT8)
    if plain is None or plain.ok or plain.error:
        why = "plain int8 was not built" if plain is None or plain.error else "plain int8 is within budget"
        return {"needed": False, "why": why, "attempts": []}
    log: dict[str, Any] = {"needed": True, "why": f"{PLAIN_INT8}: {plain.reason}", "attempts": []}

    def note(r, step: str, detail: str = "") -> None:
        log["attempts"].append({"step": step, "variant": r.name, "ok": r.ok, "reason": r.reason or r.error,
                                "accuracy": r.accuracy.get("accuracy"), "fidelity": r.fidelity, "detail": detail})

    for name in RECOVERY:
        r = ev.results.get(name) or ev.judge(CATALOG[name], recovery="int8 recipe")
        note(r, {"ort-int8-dynamic-pc": "per-channel weights"}.get(name, "static calibration"))
    if ev.results.get(MIXED_BASE) is not None and ev.results[MIXED_BASE].ok:
        return log
    base = CATALOG[MIXED_BASE]
    texts = calibration_texts[:SENSITIVITY_TEXTS]
    ev.progress(f"sensitivity analysis of {base.name} on {len(texts)} calibration texts")
    ranked = sensitivity(ev, base, texts)
    log["sensitivity"] = [{"node": n, "error": s} for n, s in ranked]
    for k in keep_counts(len(ranked)):
        keep = tuple(n for n, _ in ranked[:k])
        v = replace(base, name=MIXED, keep_fp32=keep,
                    note=f"dynamic int8 per-channel; the {k} most sensitive of {len(ranked)} nodes kept fp32")
        r = ev.judge(v, recovery="sensitivity fallback", keep=False)
        note(r, f"keep {k} node(s) fp32", ", ".join(keep))
        if r.ok:
            log["kept_fp32"] = [{"node": n, "error": s, "why": f"rank {i + 1} of {len(ranked)} by output error "
                                 f"when quantized alone"} for i, (n, s) in enumerate(ranked[:k])]
            break
    return log

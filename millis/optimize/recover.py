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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from millis.encoder.tasks import OUTPUT_NAME
from millis.optimize.build.variants import CATALOG, DYNAMIC_INT8, MIXED_BASE, RECOVERY, Builder, Variant
from millis.optimize.judge import Judge, Judged, JudgeContext, VariantResult, outputs_on
from millis.runtimes import open_runtime

PLAIN_INT8 = "ort-int8-dynamic"
SENSITIVITY_TEXTS = 256
MIXED = "ort-int8-mixed"

Ranking = Callable[[Variant, list[str]], list[tuple[str, float]]]  # (int8 variant, texts) -> [(node, error)]


@dataclass
class Recovery:
    """What recovery did (`log`, shown in the report) and the variants it adds to the run (`judged`:
    the int8 recipes it tried, and the mixed-precision variant that met the budget, if one did)."""

    log: dict[str, Any]
    judged: list[Judged] = field(default_factory=list)


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


def sensitivity(ctx: JudgeContext, builder: Builder, base: Variant, texts: list[str]) -> list[tuple[str, float]]:
    """[(node, error when only that node is int8)], most harmful first."""
    from millis.optimize.build import quantize  # onnx: only the CPU's int8 recovery needs it

    fused = builder.graph(base.passes[:-1])  # the fp32 graph the int8 pass starts from
    args = {k: v for k, v in DYNAMIC_INT8[base.passes[-1]].items() if k != "op_types"}
    nodes = quantize.quantizable_nodes(fused)
    task, names, threads = ctx.task, ctx.src.input_names, ctx.threads
    opts = {"graph_level": "all", "task": task}
    ref_rt = open_runtime("onnxruntime", fused.parent, "fp32", names, OUTPUT_NAME[task], dict(opts, file=fused.name),
                          threads)
    ref = outputs_on(ref_rt, ctx, texts)
    tmp = Path(tempfile.mkdtemp(prefix="millis-sens-"))
    scores = []
    try:
        for i, node in enumerate(nodes):
            ctx.progress(f"sensitivity {i + 1}/{len(nodes)}: {node}")
            path = tmp / "model.onnx"
            quantize.dynamic(fused, path, only=(node,), **args)
            rt = open_runtime("onnxruntime", tmp, node, names, OUTPUT_NAME[task], opts, threads)
            scores.append((node, error(ref, outputs_on(rt, ctx, texts))))
            del rt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(scores, key=lambda s: -s[1])


def recover(judged: Mapping[str, VariantResult], judge: Judge, rank: Ranking, calibration_texts: list[str],
            progress: Callable[[str], None] = lambda msg: None) -> Recovery:
    """Run recovery if plain int8 (in `judged`, the results so far) is over budget. `judge` judges a
    variant; `rank` orders an int8 variant's nodes by harm (`sensitivity`, bound to the run)."""
    plain = judged.get(PLAIN_INT8)
    if plain is None or plain.ok or plain.error:
        why = "plain int8 was not built" if plain is None or plain.error else "plain int8 is within budget"
        return Recovery({"needed": False, "why": why, "attempts": []})
    out = Recovery({"needed": True, "why": f"{PLAIN_INT8}: {plain.reason}", "attempts": []})

    def note(r: VariantResult, step: str, detail: str = "") -> None:
        out.log["attempts"].append({"step": step, "variant": r.name, "ok": r.ok, "reason": r.reason or r.error,
                                    "accuracy": r.accuracy.get("accuracy"), "fidelity": r.fidelity, "detail": detail})

    seen = dict(judged)
    for name in RECOVERY:
        if name not in seen:
            j = judge(CATALOG[name], recovery="int8 recipe")
            out.judged.append(j)
            seen[name] = j.result
        note(seen[name], {"ort-int8-dynamic-pc": "per-channel weights"}.get(name, "static calibration"))
    if seen.get(MIXED_BASE) is not None and seen[MIXED_BASE].ok:
        return out
    base = CATALOG[MIXED_BASE]
    texts = calibration_texts[:SENSITIVITY_TEXTS]
    progress(f"sensitivity analysis of {base.name} on {len(texts)} calibration texts")
    ranked = rank(base, texts)
    out.log["sensitivity"] = [{"node": n, "error": s} for n, s in ranked]
    for k in keep_counts(len(ranked)):
        keep = tuple(n for n, _ in ranked[:k])
        v = replace(base, name=MIXED, keep_fp32=keep,
                    note=f"dynamic int8 per-channel; the {k} most sensitive of {len(ranked)} nodes kept fp32")
        j = judge(v, recovery="sensitivity fallback")
        note(j.result, f"keep {k} node(s) fp32", ", ".join(keep))
        if j.result.ok:  # a failed try is reported in the log only, not measured
            out.judged.append(j)
            out.log["kept_fp32"] = [{"node": n, "error": s, "why": f"rank {i + 1} of {len(ranked)} by output error "
                                     f"when quantized alone"} for i, (n, s) in enumerate(ranked[:k])]
            break
    return out

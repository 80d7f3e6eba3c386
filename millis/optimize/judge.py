"""Build one variant, open it, and judge it: fidelity against fp32, accuracy on labelled data.

The gate that makes a variant selectable is accuracy (at most `Budget.max_drop` points below the
fp32 reference) when labelled data is given, else fidelity (`Budget` cosine / logit limits).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from millis.artifact.model import run_texts
from millis.optimize.config import OptimizeConfig
from millis.evaluate.run import argmax_labels, classification_metrics, embedding_agreement
from millis.optimize.fidelity import compare, within
from millis.common.readers import Labeled
from millis.optimize.measure import cold_start, rss_mb
from millis.runtimes import Runtime, open_runtime
from millis.optimize.select import accuracy_gate
from millis.encoder.source import ModelSource
from millis.encoder.tasks import OUTPUT_NAME
from millis.encoder.text import TextEncoder
from millis.optimize.build.variants import REFERENCE, Builder, Variant

Progress = Callable[[str], None]


@dataclass
class VariantResult:
    name: str
    runtime: str
    precision: str
    note: str
    recipe: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)     # file size, op counts
    fidelity: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # with labelled data: accuracy, macro_f1, drop_pts
    ok: bool = False
    reason: str = ""
    recovery: str = ""                                       # which recovery step added it, if any
    cold_start: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # shape name -> stats
    serve_mix: dict[str, Any] = field(default_factory=dict)  # millis.measure.serve_mix: rows/s, worst call, stalls
    error: str = ""


def recipe_of(v: Variant) -> dict[str, Any]:
    r: dict[str, Any] = {"runtime": v.runtime, "passes": list(v.passes), "options": dict(v.options)}
    if v.keep_fp32:
        r["keep_fp32"] = list(v.keep_fp32)
    return r


class VariantEvaluator:
    """Holds every judged variant (`results`) and the open runtimes of those that will be measured."""

    def __init__(self, cfg: OptimizeConfig, src: ModelSource, enc: TextEncoder, builder: Builder,
                 texts: list[str], target_batch: dict[str, np.ndarray], data: Labeled | None,
                 progress: Progress):
        self.cfg, self.src, self.enc, self.builder = cfg, src, enc, builder
        self.texts, self.target_batch, self.data, self.progress = texts, target_batch, data, progress
        self.results: dict[str, VariantResult] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.ref_out: np.ndarray | None = None
        self.ref_acc: float | None = None

    def open(self, v: Variant, vdir) -> Runtime:
        opts = dict(v.options, task=self.cfg.task)
        return open_runtime(v.runtime, vdir, v.name, self.src.input_names, OUTPUT_NAME[self.cfg.task],
                            opts, self.cfg.measure.threads)

    def judge(self, v: Variant, recovery: str = "", keep: bool = True, builder: Builder | None = None,
              compressed: dict[str, Any] | None = None) -> VariantResult:
        """Build, open, check. keep=False: judged but not kept for measurement (a failed try).
        `builder` builds from another (compressed) model; `compressed` describes it in the recipe."""
        self.progress(f"building {v.name}")
        r = VariantResult(v.name, v.runtime, v.precision, v.note, recipe_of(v), recovery=recovery)
        if compressed:
            r.recipe["compressed"] = compressed
        try:
            t0 = time.perf_counter()
            vdir, r.facts = (builder or self.builder).build(v)
            r.facts["build_s"] = time.perf_counter() - t0
            rss0 = rss_mb()
            rt, load_s, first_s = cold_start(lambda: self.open(v, vdir), self.target_batch)
            r.cold_start = {"load_s": load_s, "first_call_s": first_s, "total_s": load_s + first_s}
            r.rss_mb = rss_mb() - rss0
            if getattr(rt, "effective_precision", ""):
                r.facts["effective_precision"] = rt.effective_precision
            self.progress(f"checking {v.name}")
            self._check(v, r, rt)
            r.facts["dir"] = str(vdir)
            if keep or r.ok:
                self.runtimes[v.name] = rt
        except Exception as e:  # one variant failing (e.g. a runtime missing) must not sink the run
            if v.name == REFERENCE:
                raise
            r.error, r.reason = f"{type(e).__name__}: {e}", "build or run failed"
            self.progress(f"skipped {v.name}: {r.error[:200]}")
        if keep or r.ok:
            self.results[v.name] = r
        return r

    def _check(self, v: Variant, r: VariantResult, rt: Runtime) -> None:
        y = run_texts(rt, self.enc, self.texts, max_batch=8).outputs
        if v.name == REFERENCE:
            self.ref_out = y
        r.fidelity = compare(self.cfg.task, self.ref_out, y)
        if self.cfg.task == "embed":
            r.fidelity.update({k: x for k, x in embedding_agreement(self.ref_out, y).items() if k != "n"})
        if self.data is not None:
            r.accuracy = self.accuracy(rt)
        if v.name == REFERENCE:
            r.ok, r.reason = True, "reference"
        elif self.data is not None:
            r.ok, r.reason = accuracy_gate(self.ref_acc, r.accuracy["accuracy"], self.cfg.budget.max_drop)
        else:
            r.ok, r.reason = within(self.cfg.task, r.fidelity, self.cfg.budget)

    def accuracy(self, rt: Runtime) -> dict[str, float]:
        logits = run_texts(rt, self.enc, list(self.data.texts)).outputs
        m = classification_metrics(list(self.data.labels), argmax_labels(logits, self.src.id2label))
        if self.ref_acc is None:  # the reference is judged first
            self.ref_acc = m["accuracy"]
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"],
                "drop_pts": 100.0 * (self.ref_acc - m["accuracy"])}

    def outputs(self, rt: Runtime, texts: list[str]) -> np.ndarray:
        return run_texts(rt, self.enc, texts).outputs

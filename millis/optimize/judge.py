"""Build one variant, open it, and judge it: fidelity against fp32, accuracy on the selection data.

The gate that makes a variant selectable is accuracy (at most `Budget.max_drop` points below the
fp32 reference) when labelled selection data is given, else fidelity (`Budget` cosine / logit limits).

Judging is a function: `judge(variant, ctx, ref, builder) -> Judged`. It holds no collection; the
caller (the pipeline) owns the judged variants. The reference is judged first (`judge_reference`),
and every other variant is compared with what it returned (`Reference`).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from millis.artifact.model import run_pairs, run_texts
from millis.common.errors import MillisError
from millis.common.readers import Labeled
from millis.encoder.source import ModelSource
from millis.encoder.tasks import OUTPUT_NAME
from millis.encoder.text import TextEncoder
from millis.evaluate.run import argmax_labels, classification_metrics, embedding_agreement
from millis.optimize.build.variants import CATALOG, REFERENCE, Builder, Variant
from millis.optimize.config import Budget
from millis.optimize.fidelity import compare, within
from millis.optimize.measure import cold_start, rss_mb
from millis.optimize.select import accuracy_gate
from millis.runtimes import Runtime, open_runtime

Progress = Callable[[str], None]
Opener = Callable[[Variant, Path], Runtime]   # (variant, its built dir) -> an open runtime


@dataclass
class VariantResult:
    """One variant's row in report.json: what it is and every figure measured on it."""

    name: str
    runtime: str
    precision: str
    note: str
    recipe: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)     # file size, op counts
    fidelity: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # with labelled data: accuracy, macro_f1, n, drop_pts
    ok: bool = False
    reason: str = ""
    recovery: str = ""                                       # which recovery step added it, if any
    cold_start: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # shape name -> stats
    # millis.optimize.measure.serve_mix: rows/s, worst call, stalls
    serve_mix: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Judged:
    """A judged variant: its report row, the directory it was built into (the HF source dir for the
    torch reference; None when the build failed) and its open runtime (None when it did not run)."""

    result: VariantResult
    dir: Path | None = None
    runtime: Runtime | None = None

    @property
    def name(self) -> str:
        return self.result.name


@dataclass(frozen=True)
class Reference:
    """What the other variants are judged against: the fp32 reference's outputs on the fidelity
    texts, (N, D), and its accuracy on the selection data (None without labelled data)."""

    outputs: np.ndarray
    accuracy: float | None = None


@dataclass(frozen=True)
class JudgeContext:
    """What judging needs, fixed for one optimize run."""

    task: str                              # classify | embed
    budget: Budget                         # the fidelity / accuracy gate
    threads: int                           # runtime intra-op threads (0 = all)
    src: ModelSource
    enc: TextEncoder
    texts: list[str]                       # fidelity texts
    target_batch: dict[str, np.ndarray]    # one batch at the target shape: the cold-start call
    data: Labeled | None                   # selection data (accuracy gate); None = fidelity gate
    progress: Progress = lambda msg: None
    open: Opener | None = None             # None = open_variant (tests pass fakes)
    pairs: tuple[tuple[str, str], ...] = ()  # rerank: fidelity on these (query, document) pairs, not texts
    gpu_buckets: tuple[str, ...] = ()      # GPU variants: the shapes they capture (measured and serve-mix ones)


RERANK_DOCS = 5  # documents each query of a reranker's fidelity pairs is ranked among


def rerank_pairs(texts: list[str]) -> tuple[tuple[str, str], ...]:
    """(query, document) pairs for a reranker's fidelity, RERANK_DOCS a query, from the fidelity texts: every
    fourth text is a query, ranked among itself (a match), its first half (a near match: the close scores a
    ranking turns on) and the three texts after it (unrelated); `fidelity.compare(group=RERANK_DOCS)` reads
    them by query."""
    n, pairs = len(texts), []
    for i in range(0, n, 4):
        q = texts[i]
        words = q.split()
        pairs += [(q, q), (q, " ".join(words[:max(1, len(words) // 2)]))]
        pairs += [(q, texts[(i + k) % n]) for k in (1, 2, 3)]
    return tuple(pairs)


SHORT_EVERY = 8  # every eighth fidelity text gives its short forms


def short_forms(texts: list[str]) -> list[str]:
    """Short texts for the fidelity gate, made from the fidelity texts (none of them already): every SHORT_EVERY-th
    text's first word and first two words. A query of a word or two is what search and intents send, and where
    per-row int7 activations lose most (MiniLM int7-row-att8: cosine min 0.944 on such texts, 0.958 on sentences)."""
    have, out = {t.strip() for t in texts}, []
    for t in texts[::SHORT_EVERY]:
        words = t.split()
        for k in (1, 2):
            form = " ".join(words[:k])
            if len(words) > k and form not in have:
                have.add(form)
                out.append(form)
    return out


def gate_group(ctx: "JudgeContext") -> int:
    """compare's `group`: a reranker's pairs are ranked by query."""
    return RERANK_DOCS if ctx.pairs else 0


def outputs_on(rt: Runtime, ctx: JudgeContext, texts: list[str]) -> np.ndarray:
    """`rt`'s outputs on other texts (the sensitivity ranking's): a reranker's on their rerank_pairs."""
    if ctx.pairs:
        return run_pairs(rt, ctx.enc, list(rerank_pairs(texts)), max_batch=8).outputs
    return run_texts(rt, ctx.enc, texts).outputs


def fidelity_outputs(rt: Runtime, ctx: JudgeContext) -> np.ndarray:
    """`rt`'s outputs on the fidelity inputs: the pairs of a reranker, else the texts."""
    if ctx.pairs:
        return run_pairs(rt, ctx.enc, list(ctx.pairs), max_batch=8).outputs
    return run_texts(rt, ctx.enc, ctx.texts, max_batch=8).outputs


class Judge(Protocol):
    """`judge` bound to one run's context and reference (functools.partial): what recovery and
    compression call to judge the variants they add."""

    def __call__(self, v: Variant, *, builder: Builder = ..., recovery: str = "",
                 compressed: dict[str, Any] | None = None) -> Judged: ...


def recipe_of(v: Variant) -> dict[str, Any]:
    r: dict[str, Any] = {"runtime": v.runtime, "passes": list(v.passes), "options": dict(v.options)}
    if v.keep_fp32:
        r["keep_fp32"] = list(v.keep_fp32)
    return r


def open_variant(task: str, threads: int, src: ModelSource, v: Variant, vdir: Path,
                 gpu_buckets: tuple[str, ...] = ()) -> Runtime:
    opts = dict(v.options, task=task)
    if v.runtime == "cuda" and gpu_buckets:
        opts.setdefault("buckets", list(gpu_buckets))
    return open_runtime(v.runtime, vdir, v.name, src.input_names, OUTPUT_NAME[task], opts, threads)


def accuracy(rt: Runtime, ctx: JudgeContext, ref_accuracy: float | None) -> dict[str, float]:
    """Accuracy and macro-F1 of `rt` on every row of the selection data; drop_pts against the reference
    (`ref_accuracy` None: this is the reference, drop 0)."""
    logits = run_texts(rt, ctx.enc, list(ctx.data.texts)).outputs
    m = classification_metrics(list(ctx.data.labels), argmax_labels(logits, ctx.src.id2label))
    base = m["accuracy"] if ref_accuracy is None else ref_accuracy
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"],
            "drop_pts": 100.0 * (base - m["accuracy"]), "nonfinite_rows": int((~np.isfinite(logits)).any(-1).sum())}


WARMED: set[str] = set()  # runtime kinds opened once in this process: cold start and RSS are the variant's own


def _build_and_open(v: Variant, ctx: JudgeContext, builder: Builder, r: VariantResult) -> tuple[Path, Runtime]:
    ctx.progress(f"building {v.name}")
    t0 = time.perf_counter()
    vdir, r.facts = builder.build(v)
    r.facts["build_s"] = time.perf_counter() - t0
    opener = ctx.open or (lambda var, d: open_variant(ctx.task, ctx.threads, ctx.src, var, d, ctx.gpu_buckets))
    if v.runtime not in WARMED:  # the first variant of a runtime paid its imports and one-off setup (torch: 1.8 s
        warm, _, _ = cold_start(lambda: opener(v, vdir), ctx.target_batch)  # and 140 MB of transformers' code)
        del warm
        gc.collect()
        WARMED.add(v.runtime)
    rss0 = rss_mb()
    rt, load_s, first_s = cold_start(lambda: opener(v, vdir), ctx.target_batch)
    r.cold_start = {"load_s": load_s, "first_call_s": first_s, "total_s": load_s + first_s}
    r.rss_mb = rss_mb() - rss0
    if getattr(rt, "effective_precision", ""):
        r.facts["effective_precision"] = rt.effective_precision
    ctx.progress(f"checking {v.name}")
    return vdir, rt


def judge_reference(ctx: JudgeContext, builder: Builder) -> tuple[Judged, Reference]:
    """Build and run the fp32 reference; a failure here ends the run (nothing can be judged)."""
    v = CATALOG[REFERENCE]
    r = VariantResult(v.name, v.runtime, v.precision, v.note, recipe_of(v))
    vdir, rt = _build_and_open(v, ctx, builder, r)
    y = fidelity_outputs(rt, ctx)
    r.fidelity = compare(ctx.task, y, y, gate_group(ctx))
    if ctx.task == "embed":
        r.fidelity.update({k: x for k, x in embedding_agreement(y, y).items() if k != "n"})
    if ctx.data is not None:
        r.accuracy = accuracy(rt, ctx, None)
    bad = r.fidelity.pop("nonfinite_rows") + (r.accuracy.pop("nonfinite_rows") if r.accuracy else 0)
    if bad:
        raise MillisError(f"the fp32 reference itself gives NaN or Inf outputs on {bad} texts: nothing can be "
                          f"judged against it (is the model's checkpoint corrupt?)")
    r.ok, r.reason = True, "reference"
    return Judged(r, vdir, rt), Reference(y, r.accuracy["accuracy"] if r.accuracy else None)


def judge(v: Variant, ctx: JudgeContext, ref: Reference, builder: Builder, recovery: str = "",
          compressed: dict[str, Any] | None = None) -> Judged:
    """Build `v` with `builder`, open it, and gate it against `ref`. A variant that fails to build or run
    comes back with `result.error` set and no runtime: one variant must not sink the run.
    `recovery` names the recovery step that added it; `compressed` describes the student it was built from."""
    r = VariantResult(v.name, v.runtime, v.precision, v.note, recipe_of(v), recovery=recovery)
    if compressed:
        r.recipe["compressed"] = compressed
    try:
        vdir, rt = _build_and_open(v, ctx, builder, r)
        y = fidelity_outputs(rt, ctx)
        r.fidelity = compare(ctx.task, ref.outputs, y, gate_group(ctx))
        if ctx.task == "embed":
            r.fidelity.update({k: x for k, x in embedding_agreement(ref.outputs, y).items() if k != "n"})
        if r.fidelity["nonfinite_rows"]:  # whatever the labels say: such a variant is broken
            r.ok, r.reason = within(ctx.task, r.fidelity, ctx.budget)
        elif ctx.data is not None:
            r.accuracy = accuracy(rt, ctx, ref.accuracy)
            r.ok, r.reason = accuracy_gate(ref.accuracy, r.accuracy["accuracy"], ctx.budget.max_drop)
            if r.accuracy.pop("nonfinite_rows"):
                r.ok, r.reason = False, "NaN or Inf logits on the selection data"
        else:
            r.ok, r.reason = within(ctx.task, r.fidelity, ctx.budget)
    except Exception as e:  # e.g. a runtime missing
        r.error, r.reason = f"{type(e).__name__}: {e}", "build or run failed"
        ctx.progress(f"skipped {v.name}: {r.error[:200]}")
        return Judged(r)
    return Judged(r, vdir, rt)

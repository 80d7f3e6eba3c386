"""Build one variant, open it, and judge it: fidelity against fp32, accuracy on the selection data.

The gate that makes a variant selectable is accuracy (at most `Budget.max_drop` points below the
fp32 reference) when labelled selection data is given, else fidelity (`Budget` cosine / logit limits).

Judging is a function: `judge(variant, ctx, ref, builder) -> Judged`. It holds no collection; the
caller (the pipeline) owns the judged variants. The reference is judged first (`judge_reference`),
and every other variant is compared with what it returned (`Reference`).
"""
from __future__ import annotations

import functools
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from millis.artifact.model import MAX_BATCH, run_pairs, run_texts
from millis.common.errors import MillisError
from millis.common.readers import Labeled
from millis.encoder.source import ModelSource
from millis.encoder.tasks import OUTPUT_NAME
from millis.encoder.text import TextEncoder
from millis.evaluate.run import argmax_labels, classification_metrics, embedding_agreement
from millis.optimize.build.variants import CATALOG, REFERENCE, Builder, Variant
from millis.optimize.config import Budget
from millis.optimize.fidelity import compare, within, worse
from millis.optimize.footprint import footprint_mb
from millis.optimize.measure import cold_start
from millis.optimize.select import accuracy_gate
from millis.runtimes import Runtime, open_runtime
from millis.runtimes.base import shares_scales_across_rows

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
    flipped: dict[str, float] = field(default_factory=dict)   # with labelled data: rows whose argmax is not fp32's
    batching: dict[str, Any] = field(default_factory=dict)    # rows a call it was judged at (judged_batches)
    ok: bool = False
    reason: str = ""
    recovery: str = ""                                       # which recovery step added it, if any
    cold_start: dict[str, float] = field(default_factory=dict)  # load + first call, its runtime already imported
    rss_mb: float | None = None   # what it adds to a fresh process that imported its runtime (footprint); None: unknown
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
    texts, (N, D), its accuracy on the selection data and its predicted class per selection row (None
    without labelled data)."""

    outputs: np.ndarray
    accuracy: float | None = None
    predictions: np.ndarray | None = None


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
    footprint: bool = True                 # each variant's RSS in a fresh process (MeasureConfig.footprint)


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


FIDELITY_BATCH = 8          # rows a call on the fidelity texts
ACCURACY_BATCH = MAX_BATCH  # rows a call on the selection rows (run_texts: sorted by length, as `millis eval` runs
# them; a runtime whose rows share scales runs one row a call there, and judged_batches judges it at one row too)


def judged_batches(rt: Runtime, batched: int) -> tuple[int, ...]:
    """The rows a call `rt` is judged at: `batched`, and for a runtime whose rows share one activation scale a call
    (shares_scales_across_rows: ONNX Runtime's dynamic int8, the one rule) one row a call too, as a server runs a
    one-text request; the worse verdict is kept. A row's outputs there depend on its batch-mates and their padding:
    a verdict at one batching alone could flip at another."""
    return (batched, 1) if shares_scales_across_rows(rt) and batched != 1 else (batched,)


def outputs_on(rt: Runtime, ctx: JudgeContext, texts: list[str]) -> np.ndarray:
    """`rt`'s outputs on other texts (the sensitivity ranking's): a reranker's on their rerank_pairs."""
    if ctx.pairs:
        return run_pairs(rt, ctx.enc, list(rerank_pairs(texts)), max_batch=8).outputs
    return run_texts(rt, ctx.enc, texts).outputs


def fidelity_outputs(rt: Runtime, ctx: JudgeContext, max_batch: int = FIDELITY_BATCH) -> np.ndarray:
    """`rt`'s outputs on the fidelity inputs: the pairs of a reranker, else the texts."""
    if ctx.pairs:
        return run_pairs(rt, ctx.enc, list(ctx.pairs), max_batch=max_batch).outputs
    return run_texts(rt, ctx.enc, ctx.texts, max_batch=max_batch).outputs


def fidelity(rt: Runtime, ctx: JudgeContext, ref_outputs: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
    """(outputs at FIDELITY_BATCH, the fidelity figures against `ref_outputs`, the worse of each `judged_batches`
    batching); `ref_outputs` None: this is the reference, compared with itself."""
    figures, first = [], None
    for size in judged_batches(rt, FIDELITY_BATCH):
        y = fidelity_outputs(rt, ctx, size)
        first = y if first is None else first
        ref = y if ref_outputs is None else ref_outputs
        fid = compare(ctx.task, ref, y, gate_group(ctx))
        if ctx.task == "embed":
            fid.update({k: x for k, x in embedding_agreement(ref, y).items() if k != "n"})
        figures.append(fid)
    return first, functools.reduce(worse, figures)


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


def open_arguments(task: str, threads: int, src: ModelSource, v: Variant, vdir: Path,
                   gpu_buckets: tuple[str, ...] = ()) -> tuple:
    """What millis.runtimes.open_runtime takes to open `v` built in `vdir` (here, and in the RSS probe's process); the
    source's pooling named (a torch variant is the source folder, which may declare another: --pooling)."""
    opts = dict(v.options, task=task, pooling={"mode": src.pooling.mode, "normalize": src.pooling.normalize})
    if v.runtime == "cuda" and gpu_buckets:
        opts.setdefault("buckets", list(gpu_buckets))
    return v.runtime, vdir, v.name, tuple(src.input_names), OUTPUT_NAME[task], opts, threads


def open_variant(task: str, threads: int, src: ModelSource, v: Variant, vdir: Path,
                 gpu_buckets: tuple[str, ...] = ()) -> Runtime:
    return open_runtime(*open_arguments(task, threads, src, v, vdir, gpu_buckets))


@dataclass(frozen=True)
class Scored:
    """A runtime's accuracy on the selection rows (the worse of its `judged_batches` batchings)."""

    figures: dict[str, float]       # accuracy, macro_f1, n, drop_pts, nonfinite_rows
    predictions: np.ndarray         # the predicted class per row, of the batching kept
    flipped: dict[str, float]       # {rows, share} whose prediction is not the reference's ({} for the reference)
    by_batch: dict[str, float]      # rows a call -> accuracy there


def accuracy(rt: Runtime, ctx: JudgeContext, ref: Reference | None) -> Scored:
    """Accuracy and macro-F1 of `rt` on every row of the selection data; drop_pts against the reference and the
    predictions that differ from its (`ref` None: this is the reference, drop 0). At each `judged_batches`
    batching; the lower accuracy is kept (on a tie, the more flipped rows)."""
    kept, by_batch = None, {}
    for size in judged_batches(rt, ACCURACY_BATCH):
        logits = run_texts(rt, ctx.enc, list(ctx.data.texts), max_batch=size).outputs
        m = classification_metrics(list(ctx.data.labels), argmax_labels(logits, ctx.src.id2label))
        pred = np.nan_to_num(logits).argmax(-1)
        flips = 0 if ref is None or ref.predictions is None else int((pred != ref.predictions).sum())
        by_batch[str(size)] = m["accuracy"]
        if kept is None or (m["accuracy"], -flips) < (kept[0]["accuracy"], -kept[2]):
            kept = (m, logits, flips, pred)
    m, logits, flips, pred = kept
    base = m["accuracy"] if ref is None else ref.accuracy
    figures = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"],
               "drop_pts": 100.0 * (base - m["accuracy"]), "nonfinite_rows": int((~np.isfinite(logits)).any(-1).sum())}
    flipped = {} if ref is None else {"rows": flips, "share": flips / max(1, m["n"])}
    return Scored(figures, pred, flipped, by_batch)


def batching_of(rt: Runtime, by_batch: dict[str, float] | None) -> dict[str, Any]:
    """report.json's record of how a variant was judged: the rows a call of each gate, and its accuracy at each."""
    out: dict[str, Any] = {"shares_scales_across_rows": shares_scales_across_rows(rt),
                           "fidelity_rows_per_call": list(judged_batches(rt, FIDELITY_BATCH))}
    if by_batch is not None:
        out["accuracy_rows_per_call"] = list(judged_batches(rt, ACCURACY_BATCH))
        out["accuracy_at"] = by_batch
    return out


WARMED: set[str] = set()  # runtime kinds opened once in this process: the cold start is the variant's own


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
    rt, load_s, first_s = cold_start(lambda: opener(v, vdir), ctx.target_batch)
    r.cold_start = {"load_s": load_s, "first_call_s": first_s, "total_s": load_s + first_s}
    if ctx.open is None and ctx.footprint:  # a fake opener (tests) opens nothing another process could
        r.rss_mb, why = footprint_mb(open_arguments(ctx.task, ctx.threads, ctx.src, v, vdir, ctx.gpu_buckets),
                                     ctx.target_batch)
        if why:
            ctx.progress(f"{v.name}: {why}")
    if getattr(rt, "effective_precision", ""):
        r.facts["effective_precision"] = rt.effective_precision
    ctx.progress(f"checking {v.name}")
    return vdir, rt


def judge_reference(ctx: JudgeContext, builder: Builder) -> tuple[Judged, Reference]:
    """Build and run the fp32 reference; a failure here ends the run (nothing can be judged)."""
    v = CATALOG[REFERENCE]
    r = VariantResult(v.name, v.runtime, v.precision, v.note, recipe_of(v))
    vdir, rt = _build_and_open(v, ctx, builder, r)
    y, r.fidelity = fidelity(rt, ctx, None)
    scored = accuracy(rt, ctx, None) if ctx.data is not None else None
    if scored is not None:
        r.accuracy = scored.figures
    r.batching = batching_of(rt, scored.by_batch if scored else None)
    bad = r.fidelity.pop("nonfinite_rows") + (r.accuracy.pop("nonfinite_rows") if r.accuracy else 0)
    if bad:
        raise MillisError(f"the fp32 reference itself gives NaN or Inf outputs on {bad} texts: nothing can be "
                          f"judged against it (is the model's checkpoint corrupt?)")
    r.ok, r.reason = True, "reference"
    return Judged(r, vdir, rt), Reference(y, r.accuracy["accuracy"] if r.accuracy else None,
                                          scored.predictions if scored else None)


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
        _, r.fidelity = fidelity(rt, ctx, ref.outputs)
        r.batching = batching_of(rt, None)
        if r.fidelity["nonfinite_rows"]:  # whatever the labels say: such a variant is broken
            r.ok, r.reason = within(ctx.task, r.fidelity, ctx.budget)
        elif ctx.data is not None:
            scored = accuracy(rt, ctx, ref)
            r.accuracy, r.flipped, r.batching = scored.figures, scored.flipped, batching_of(rt, scored.by_batch)
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

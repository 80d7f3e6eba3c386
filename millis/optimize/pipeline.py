"""`millis optimize`: build every variant, check fidelity, measure, select, write the artifact."""
from __future__ import annotations

import functools
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from millis import __version__
from millis.artifact import store as artifact
from millis.artifact.meta import ArtifactMeta, Hardware, Measured, SourceMeta, VariantRecipe
from millis.common.schema import from_dict
from millis.optimize import report
from millis.optimize.report_html import write_html_report
from millis.optimize.config import Budget, OptimizeConfig, fit_shapes
from millis.common.config import Shape, to_dict
from millis.common.errors import MillisError
from millis.common.numeric import not_a_reranker
from millis.evaluate.run import check_labels
from millis.optimize.judge import Judged, JudgeContext, Reference, judge, judge_reference
from millis.common import hardware, machine_load
from millis.common.readers import Labeled, read_labeled
from millis.optimize.measure import measure, serve_mix, serve_mix_shapes
from millis.optimize.recover import Recovery, recover, sensitivity
from millis.optimize.select import (ACCURACY_FLAGS, FIDELITY_FLAGS, Candidate, finer_than_a_row,
                                    reference_fallback, select, serve_gate)
from millis.encoder.source import (ModelSource, check_encoder, declares_pooling, model_max_length, resolve,
                                   with_pooling)
from millis.encoder.tasks import OUTPUT_NAME
from millis.encoder.text import PROMPTS_FILE, TextEncoder
from millis.common.readers import read_texts
from millis.common.samples import sample_texts
from millis.artifact.meta import read_train_meta
from millis.artifact.validation import read_validation, selection_files
from millis.common.files import file_sha256
from millis.optimize.build.variants import CATALOG, REFERENCE, Builder, variants_for
from millis.optimize.judge import rerank_pairs, short_forms

Progress = Callable[[str], None]


def calibration_batches(enc: TextEncoder, texts: list[str], length: int, batch: int = 8,
                        pairs: bool = False) -> list[dict]:
    """Equal (batch, length) feeds: Percentile / Entropy stack all batches, so the last one is filled
    by wrapping around to the first texts. pairs: a reranker's, (query, document) rows of the texts
    (rerank_pairs: [CLS] q [SEP] d [SEP], token type 1 on d), as it will read them, not single texts."""
    n = -(-len(texts) // batch) * batch
    texts = [texts[i % len(texts)] for i in range(n)]
    if pairs:  # the pair tokenizer cuts each row to enc's max length (<= length)
        rows = [enc.pair_ids(q, [d])[0][0] for q, d in rerank_pairs(texts)]
        return [enc.pack(rows[i:i + batch], length) for i in range(0, n, batch)]
    return [enc.encode(texts[i:i + batch], pad_to=length).feeds for i in range(0, n, batch)]


def selection_data(cfg: OptimizeConfig, src: ModelSource) -> tuple[Labeled | None, str]:
    """(the labelled rows selection judges accuracy on, where they came from). classify only: `--data`
    when given (the user's choice), else the validation split `millis train` kept with the model, so
    the test file stays unseen for `millis eval`; (None, "") means the fidelity gate."""
    if cfg.task != "classify":  # a reranker's pairs have no labels here: the fidelity gate
        return None, ""
    if cfg.data:
        trained = read_train_meta(src.path)
        label_col = cfg.label_col or (trained.data.label_col if trained else "")
        data, where = read_labeled(cfg.data, cfg.text_col, label_col), f"{cfg.data} (--data)"
    else:
        data = read_validation(src.path)
        if data is None:
            return None, ""
        trained = read_train_meta(src.path)
        given = trained.train_config.get("validation") if trained else ""  # millis train --validation FILE
        train_file = trained.data.path if trained else "the training file"
        where = (f"{data.path}: the validation rows `millis train` read from {given}" if given else
                 f"{data.path}: the validation split `millis train` held out of {train_file}")
    check_labels(data, src.id2label)
    return data, f"{where}, {len(data)} rows"


def read_paths(cfg: OptimizeConfig, src: ModelSource) -> tuple[str, ...]:
    """What optimize reads, which --out must neither be, hold nor lie inside: the source model, the files
    the flags name, and the training file `millis train` recorded (students and calibration read it)."""
    trained = read_train_meta(src.path)
    return (str(src.path), cfg.data, cfg.sample_texts, cfg.calibration_texts, cfg.compress_data,
            trained.data.path if trained else "")


def selection_sha256(cfg: OptimizeConfig, data: Labeled | None, src: ModelSource) -> tuple[str, ...]:
    """sha256 of each file whose rows chose or fitted what optimize ships (Measured.selection_sha256): the
    selection rows' file, the fidelity texts' (--sample-texts, or --data read as texts), the calibration texts'
    and a trained source's validation rows: `millis eval` on any of them is no test score."""
    given = [cfg.data, cfg.sample_texts, cfg.calibration_texts]
    files = ([Path(data.path)] if data is not None else []) + [Path(f) for f in given if f] + selection_files(src.path)
    return tuple(dict.fromkeys(file_sha256(f) for f in files))


def calibration_rows(cfg: OptimizeConfig, src: ModelSource, data: Labeled | None,
                     fidelity: list[str] = ()) -> tuple[list[str], str]:
    """(texts, where from) for int8 calibration and the sensitivity ranking, never rows selection judges (the
    validation rows a trained model kept, the selection rows, the fidelity texts): --calibration-texts less those,
    else a seeded 512 of the training rows `millis train` recorded, less those; else the shipped texts (less
    those). A static variant fitted on the rows that judge it looks better than it is."""
    judged = {t.strip() for t in data.texts} if data is not None else set()
    judged |= {t.strip() for t in fidelity}
    kept = read_validation(src.path)
    judged |= {t.strip() for t in kept.texts} if kept is not None else set()
    if cfg.calibration_texts:
        given = list(dict.fromkeys(r.strip() for r in read_texts(cfg.calibration_texts, cfg.text_col)))
        rows = [t for t in given if t not in judged][:512]
        if not rows:
            raise MillisError(f"--calibration-texts {cfg.calibration_texts}: every text is one selection judges "
                              f"(the validation, selection or fidelity rows); give texts it does not")
        dropped = sum(t in judged for t in given)
        note = f" (less {dropped} texts selection judges)" if dropped else ""
        return rows, f"{cfg.calibration_texts}{note}"
    trained = read_train_meta(src.path)
    if trained is not None and Path(trained.data.path).is_file():
        try:
            rows = read_texts(trained.data.path, trained.data.text_col)
        except MillisError:  # unreadable now: fall back to the shipped texts
            rows = []
        rows = [t for t in dict.fromkeys(r.strip() for r in rows) if t not in judged]
        if rows:  # a seeded sample: a training file is often sorted by label
            rows = random.Random(0).sample(rows, min(512, len(rows)))
            return rows, f"{trained.data.path} (training rows, not the validation or selection rows)"
    return [t for t in sample_texts() if t.strip() not in judged], "the texts shipped with millis"


# optimize's file flags: each names a file to read, never a directory ("data file not found: DIR" said the wrong thing)
INPUT_FLAGS = {"data": "--data", "sample_texts": "--sample-texts", "calibration_texts": "--calibration-texts",
               "compress_data": "--compress-data"}


def check_inputs(cfg: OptimizeConfig) -> None:
    """Refuse a file flag naming a directory, by its flag, before any work."""
    for name, option in INPUT_FLAGS.items():
        path = getattr(cfg, name)
        if path and Path(path).is_dir():
            raise MillisError(f"{option} {path}: is a directory; name a file in it (CSV, TSV or JSONL"
                              f"{'' if name in ('data', 'compress_data') else ', or text lines'})")


def optimize(cfg: OptimizeConfig, progress: Progress = lambda msg: None,
             choose: Callable[[list[Candidate]], Candidate] | None = None) -> Path:
    """Run the whole pipeline for `cfg`; return the artifact directory. `choose` picks the variant
    to ship from every measured one (default `select`; a benchmark may ship a named variant)."""
    check_inputs(cfg)
    src = resolve(cfg.source)
    for what in ("--compress",) * bool(cfg.compress) + (f"--task {cfg.task}",) * (cfg.task != "embed"):
        check_encoder(src, what)  # a decoder embedder: embed, as it is
    if (pooled := with_pooling(src, cfg.pooling)) is not src:
        if cfg.compress:  # (distillation and pruning reread the folder: their students would pool otherwise)
            raise MillisError(f"--pooling {cfg.pooling} with --compress: the students learn from the folder as it "
                              f"declares itself; add sentence-transformers' modules.json (a Pooling module) instead")
        src = pooled
    elif not cfg.pooling and cfg.task == "embed" and not declares_pooling(src.path):
        progress(f"note: {cfg.source} declares no pooling (no sentence-transformers modules.json): its vectors are "
                 f"the mean of its token states; --pooling cls, max, last-token or splade if it was trained to pool "
                 f"otherwise")
    if cfg.task == "rerank" and (why := not_a_reranker(len(src.id2label), src.problem_type)):
        raise MillisError(f"--task rerank: {cfg.source} {why} (--task classify serves its labels)")
    if cfg.task == "embed" and src.has_classifier:
        progress(f"note: {cfg.source} is a classifier ({len(src.id2label)} labels); --task embed pools its encoder's "
                 f"outputs and leaves the classification head unused (--task classify keeps it)")
    if cfg.device == "cuda" and not hardware.has_cuda():
        raise MillisError("optimize --device cuda needs a CUDA GPU (torch sees none)")
    artifact.check_out(cfg.out, read_paths(cfg, src))  # now, not after the measurements: _write checks again
    unknown = [n for n in cfg.variants if n not in CATALOG]  # now, not after minutes of building the others (not
    if unknown:  # in the config: an artifact's recorded config may name a variant a later millis dropped)
        raise MillisError(f"--variants: unknown variant(s) {', '.join(unknown)}; known: {', '.join(CATALOG)}")
    max_len = model_max_length(src, cfg.max_length)
    cfg = fit_shapes(cfg, max_len, progress)
    enc = TextEncoder(src.path, src.input_names, max_len, segments=src.segments)
    data, selection = selection_data(cfg, src)
    if data is not None:
        progress(f"selecting on accuracy on {selection}")
        if coarse := finer_than_a_row(cfg.budget.max_drop, len(data)):
            progress(f"warning: {coarse}")
        if cfg.budget.max_logit_diff != Budget().max_logit_diff:  # the accuracy gate alone reads labelled rows
            progress("warning: --max-logit-diff is not read when selecting on labelled rows (--max-drop is the gate)")
        if not cfg.data:  # the artifact's config records the rows selection used, and their columns
            cfg = replace(cfg, data=str(data.path), text_col=data.text_col, label_col=data.label_col)
    if cfg.sample_texts:
        texts, where = read_texts(cfg.sample_texts, cfg.text_col, limit=512), cfg.sample_texts
    elif cfg.data:  # fidelity on the user's own texts (classify: the selection data's first rows)
        texts = list(data.texts[:512]) if data is not None else read_texts(cfg.data, cfg.text_col, limit=512)
        where = cfg.data
    else:  # half of them: the other half calibrates (a static variant fitted on the texts that judge it looks
        # better than it is: percentile on MiniLM, cosine min 0.881 judged on its own calibration texts, 0.910 apart)
        texts, where = sample_texts()[::2], "the texts shipped with millis (every other one; the rest calibrate)"
    fidelity_texts = f"{len(texts)} texts from {where}"
    pairs = rerank_pairs(texts) if cfg.task == "rerank" else ()
    if pairs:
        fidelity_texts = f"{len(pairs)} (query, document) pairs of {fidelity_texts}"
    judged = texts  # what the fidelity gate reads: with a word or two of some, where row-scaled int7 loses most
    if not pairs and (short := short_forms(texts)):  # (timing and the serve mix keep the texts' own lengths)
        judged = texts + short
        fidelity_texts += f", and {len(short)} short forms of them (their first word or two)"
    calib_texts, calib_where = calibration_rows(cfg, src, data, judged)
    progress(f"calibrating on {len(calib_texts)} texts from {calib_where}")
    calib_len = min(max_len, 128)  # one fixed length: Percentile / Entropy need equal shapes
    # truncates at that length too; token types as `enc` gives them (a RoBERTa pair: all 0, its one type)
    calib_enc = TextEncoder(src.path, src.input_names, calib_len, segments=src.segments)
    calibration = functools.cache(lambda: calibration_batches(calib_enc, calib_texts, calib_len,
                                                              pairs=cfg.task == "rerank"))
    shapes = tuple(dict.fromkeys(cfg.measure.shapes + (cfg.target,)))
    inputs = {s: enc.fill(texts, s.batch, s.seq) for s in shapes}

    work = Path(tempfile.mkdtemp(prefix="millis-work-"))
    try:
        builder = Builder(src, cfg.model_task, work, calibration)
        ctx = JudgeContext(cfg.model_task, cfg.budget, cfg.measure.threads, src, enc, judged, inputs[cfg.target],
                           data, progress, pairs=pairs, gpu_buckets=capture_shapes(cfg, max_len, shapes),
                           footprint=cfg.measure.footprint)
        reference, ref = judge_reference(ctx, builder)
        judge_one = functools.partial(judge, ctx=ctx, ref=ref, builder=builder)
        pool = judge_all(reference, judge_one, variants_for(cfg.variants, cfg.preset, cfg.device))  # name -> judged, in order
        recovery = Recovery({"needed": False, "why": "disabled", "attempts": []})
        if cfg.recover:
            recovery = recover({n: j.result for n, j in pool.items()}, judge_one,
                               functools.partial(sensitivity, ctx, builder), calib_texts, progress)
        pool.update((j.name, j) for j in recovery.judged)
        if cfg.compress:
            from millis.optimize.compress import judge_compressed
            # the students never train on what judges them: the selection rows, the fidelity texts, their files
            pool.update((j.name, j) for j in judge_compressed(
                cfg.model_task, cfg.compress, cfg.compress_data, cfg.text_col, src, work, calibration, judge_one,
                progress, data, fidelity=tuple(ctx.texts),
                judged_files=tuple(f for f in (cfg.data, cfg.sample_texts) if f)))
        runtimes = {n: j.runtime for n, j in pool.items() if j.runtime is not None}
        progress(f"measuring {len(runtimes)} variants x {len(shapes)} shapes")
        before, failed = machine_load.snapshot(), {}
        lat = measure(runtimes, inputs, cfg.measure,
                      on_round=lambda i: progress(f"measured round {i + 1}/{cfg.measure.rounds}"), failed=failed)
        reject_failed(pool, failed, progress)
        for name, per_shape in lat.items():
            pool[name].result.latency = per_shape
        _serve_mix(cfg, pool, enc, texts + calib_texts, max_len, shapes, progress)  # timing only: any texts
        # the load over both timings selection reads: the latencies and the serve mix (its rows/s break ties)
        load = machine_load.check(before, machine_load.snapshot(),
                                  {f"{n} {s}": c["spread"] for n, per in lat.items() for s, c in per.items()})
        for w in load["warnings"]:
            progress(f"warning: {w}")
        gate = ACCURACY_FLAGS if data is not None else FIDELITY_FLAGS  # the flags select's error names
        choose = choose or functools.partial(select, budget_flags=gate)
        chosen = choose([Candidate(j.name, j.result.latency[cfg.target.name]["p50_ms"], j.result.ok, j.result.reason,
                                   j.result.serve_mix.get("rows_per_s", 0.0))
                         for j in pool.values() if j.result.latency])
        progress(f"chosen: {chosen.name}")
        if fallback := reference_fallback([vars(j.result) for j in pool.values()], chosen.name):
            progress(f"warning: {fallback}")
        return _write(cfg, src, max_len, pool, ref, recovery.log, chosen.name, fidelity_texts, selection, progress,
                      load, selection_sha256(cfg, data, src))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def capture_shapes(cfg: OptimizeConfig, max_len: int, shapes: tuple) -> tuple[str, ...]:
    """The shapes a GPU variant captures while judged: the measured ones and those of the serve mix."""
    from millis.artifact.model import gpu_buckets

    mix = gpu_buckets(cfg.measure.serve_max_batch, max_len, cfg.measure.serve_max_tokens)
    return tuple(dict.fromkeys([s.name for s in shapes] + mix))


def judge_all(reference: Judged, judge_one: Callable[..., Judged], variants: list) -> dict[str, Judged]:
    """{name: judged} for the reference then every other variant, in the order given."""
    pool = {reference.name: reference}
    for v in variants:
        if v.name != REFERENCE:
            pool[v.name] = judge_one(v)
    return pool


def reject_failed(pool: dict[str, Judged], failed: dict[str, str], progress: Progress) -> None:
    """Variants whose runtime raised while timed: not ok, measured no more (the fp32 reference cannot be spared)."""
    for name, why in failed.items():
        if name == REFERENCE:
            raise MillisError(f"the fp32 reference {REFERENCE}: {why}")
        j = pool[name]
        j.result.ok, j.result.reason, j.runtime = False, why, None
        progress(f"rejected {name}: {why}")


def _serve_mix(cfg: OptimizeConfig, pool: dict[str, Judged], enc: TextEncoder, texts: list[str], max_len: int,
               measured: tuple[Shape, ...], progress: Progress) -> None:
    """Run the serve mix; a variant within budget that stalls on new shapes, or serves far below the
    best, becomes not ok, the reason recorded beside the others."""
    ids, _ = enc.token_ids(texts)
    mix_shapes = serve_mix_shapes(cfg.measure, [len(r) for r in ids], max_len, exclude=measured)
    if not mix_shapes:
        return
    runtimes = {n: j.runtime for n, j in pool.items() if j.runtime is not None}
    progress(f"serve mix: {len(runtimes)} variants x {len(mix_shapes)} new shapes, cold then warm")
    failed: dict[str, str] = {}
    mix = serve_mix(runtimes, {s: enc.fill(texts, s.batch, s.seq) for s in mix_shapes}, cfg.measure, failed)
    reject_failed(pool, failed, progress)
    for name, m in mix.items():
        pool[name].result.serve_mix = m
    within = {n: m for n, m in mix.items() if pool[n].result.ok}
    for name, why in serve_gate(within, cfg.measure.serve_floor, cfg.measure.stall_share).items():
        r = pool[name].result
        r.ok, r.reason = False, f"{r.reason}; rejected: {why}"
        progress(f"rejected {name}: {why}")


def _write(cfg: OptimizeConfig, src: ModelSource, max_len: int, pool: dict[str, Judged], ref: Reference,
           recovery: dict[str, Any], chosen: str, fidelity_texts: str, selection: str, progress: Progress,
           load: dict[str, Any] | None = None, selected_by: tuple[str, ...] = ()) -> Path:
    results = {n: j.result for n, j in pool.items()}
    best = results[chosen]

    def fill(tmp: Path) -> ArtifactMeta:
        from transformers import AutoTokenizer

        if best.runtime == "torch":  # the reference won (tiny models): ship the HF weights
            from millis.encoder.tasks import load_task_model
            load_task_model(src, cfg.model_task).hf.save_pretrained(tmp / "hf")
        else:
            vdir = pool[chosen].dir
            for f in vdir.iterdir():
                shutil.copy2(f, tmp / f.name)
        AutoTokenizer.from_pretrained(str(src.path)).save_pretrained(str(tmp / "tokenizer"))
        if (src.path / PROMPTS_FILE).is_file():  # its named prompts (TEI's prompt_name), read beside the tokenizer
            shutil.copy2(src.path / PROMPTS_FILE, tmp / "tokenizer" / PROMPTS_FILE)
        # the judged and measured figures are plain dicts; from_dict types them (strict: no key is lost)
        variant = from_dict(VariantRecipe, {"name": best.name, "precision": best.precision, **best.recipe},
                            f"the recipe of {best.name}", strict=True)
        measured = from_dict(Measured, {"target": cfg.target.name, "latency": best.latency, "fidelity": best.fidelity,
                                        "accuracy": best.accuracy, "reference_accuracy": ref.accuracy,
                                        "cold_start": best.cold_start, "serve_mix": best.serve_mix,
                                        "fidelity_texts": fidelity_texts, "selection_data": selection,
                                        "load": load, "selection_sha256": selected_by},
                             f"the measurements of {best.name}", strict=True)
        meta = ArtifactMeta(task=cfg.model_task, output=OUTPUT_NAME[cfg.model_task], input_names=tuple(src.input_names),
                            max_length=max_len, source=SourceMeta.of(src),  # embed: no labels (a classifier's
                            id2label=dict(src.id2label) if cfg.model_task == "classify" else {},  # own)
                            variant=variant, millis_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            measured=measured, hardware=Hardware.this_machine(), config=to_dict(cfg),
                            compressed=variant.compressed)  # a distilled / pruned student won: say which
        report.write_all(tmp, meta, [r.__dict__ for r in results.values()], chosen, recovery)
        return meta

    progress(f"writing artifact to {cfg.out}")
    out = artifact.write(Path(cfg.out), fill, keep=read_paths(cfg, src))
    write_html_report(out)  # after the hashing: a view of report.json that `millis report` may rewrite
    return out

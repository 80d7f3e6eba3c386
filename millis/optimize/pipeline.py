"""`millis optimize`: build every variant, check fidelity, measure, select, write the artifact."""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from millis import __version__
from millis.artifact import store as artifact
from millis.common import hardware
from millis.optimize import report
from millis.optimize.config import OptimizeConfig
from millis.common.config import Shape, to_dict
from millis.common.errors import MillisError
from millis.evaluate.run import check_labels
from millis.optimize.judge import VariantEvaluator
from millis.common.readers import Labeled, read_labeled
from millis.optimize.measure import measure, serve_mix, serve_mix_shapes
from millis.optimize.recover import recover
from millis.optimize.select import Candidate, select, serve_gate
from millis.encoder.source import ModelSource, resolve
from millis.encoder.tasks import OUTPUT_NAME
from millis.encoder.text import TextEncoder
from millis.common.readers import read_texts
from millis.common.samples import sample_texts
from millis.artifact.meta import read_train_meta
from millis.optimize.build.variants import Builder, variants_for

Progress = Callable[[str], None]


def model_max_length(src: ModelSource, requested: int) -> int:
    limit = src.max_length
    sb = src.path / "sentence_bert_config.json"  # sentence-transformers' own, usually shorter, limit
    if sb.is_file():
        limit = min(limit, int(json.loads(sb.read_text()).get("max_seq_length", limit)))
    if requested:
        if requested > src.max_length:
            raise MillisError(f"--max-length {requested} exceeds the model's limit {src.max_length}")
        limit = requested
    return limit


def calibration_batches(enc: TextEncoder, texts: list[str], length: int, batch: int = 8) -> list[dict]:
    """Equal (batch, length) feeds: Percentile / Entropy stack all batches, so the last one is filled
    by wrapping around to the first texts."""
    n = -(-len(texts) // batch) * batch
    texts = [texts[i % len(texts)] for i in range(n)]
    return [enc.encode(texts[i:i + batch], pad_to=length).feeds for i in range(0, n, batch)]


def _labeled(cfg: OptimizeConfig, src: ModelSource) -> Labeled | None:
    if not cfg.data or cfg.task != "classify":
        return None
    label_col = cfg.label_col or ((read_train_meta(src.path) or {}).get("data", {}).get("label_col", ""))
    data = read_labeled(cfg.data, cfg.text_col, label_col)
    check_labels(data, src.id2label)
    return data


def optimize(cfg: OptimizeConfig, progress: Progress = lambda msg: None,
             choose: Callable[[list[Candidate]], Candidate] = select) -> Path:
    """Run the whole pipeline for `cfg`; return the artifact directory. `choose` picks the variant
    to ship from every measured one (default `select`; a benchmark may ship a named variant)."""
    src = resolve(cfg.source)
    max_len = model_max_length(src, cfg.max_length)
    for s in cfg.measure.shapes + (cfg.target,):
        if s.seq > max_len:
            raise MillisError(f"shape {s.name} is longer than the model's max length {max_len}")
    enc = TextEncoder(src.path, src.input_names, max_len)
    data = _labeled(cfg, src)
    if cfg.sample_texts:
        texts, where = read_texts(cfg.sample_texts, limit=512), cfg.sample_texts
    elif cfg.data:  # fidelity on the user's own texts (classify: the labelled file's first rows)
        texts = list(data.texts[:512]) if data is not None else read_texts(cfg.data, cfg.text_col, limit=512)
        where = cfg.data
    else:
        texts, where = sample_texts(), "the texts shipped with millis"
    fidelity_texts = f"{len(texts)} texts from {where}"
    calib_texts = read_texts(cfg.calibration_texts, cfg.text_col, limit=512) if cfg.calibration_texts else texts
    calib_len = min(max_len, 128)  # one fixed length: Percentile / Entropy need equal shapes
    calib_enc = TextEncoder(src.path, src.input_names, calib_len)  # truncates at that length too
    calibration = functools.cache(lambda: calibration_batches(calib_enc, calib_texts, calib_len))
    shapes = tuple(dict.fromkeys(cfg.measure.shapes + (cfg.target,)))
    inputs = {s: enc.fill(texts, s.batch, s.seq) for s in shapes}

    work = Path(tempfile.mkdtemp(prefix="millis-work-"))
    try:
        builder = Builder(src, cfg.task, work, calibration)
        ev = VariantEvaluator(cfg, src, enc, builder, texts, inputs[cfg.target], data, progress)
        for v in variants_for(cfg.variants, cfg.preset):
            ev.judge(v)
        recovery = recover(ev, calib_texts) if cfg.recover else {"needed": False, "why": "disabled", "attempts": []}
        if cfg.compress:
            from millis.optimize.compress import judge_compressed
            judge_compressed(ev, cfg, src, work, calibration, progress)
        progress(f"measuring {len(ev.runtimes)} variants x {len(shapes)} shapes")
        lat = measure(ev.runtimes, inputs, cfg.measure,
                      on_round=lambda i: progress(f"measured round {i + 1}/{cfg.measure.rounds}"))
        for name, per_shape in lat.items():
            ev.results[name].latency = per_shape
        _serve_mix(cfg, ev, enc, texts, max_len, shapes, progress)
        chosen = choose([Candidate(r.name, r.latency[cfg.target.name]["p50_ms"], r.ok, r.reason,
                                   r.serve_mix.get("rows_per_s", 0.0)) for r in ev.results.values() if r.latency])
        progress(f"chosen: {chosen.name}")
        return _write(cfg, src, max_len, ev, recovery, chosen.name, fidelity_texts, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve_mix(cfg: OptimizeConfig, ev: VariantEvaluator, enc: TextEncoder, texts: list[str], max_len: int,
               measured: tuple[Shape, ...], progress: Progress) -> None:
    """Run the serve mix; a variant within budget that stalls on new shapes, or serves far below the
    best, becomes not ok, the reason recorded beside the others."""
    ids, _ = enc.token_ids(texts)
    mix_shapes = serve_mix_shapes(cfg.measure, [len(r) for r in ids], max_len, exclude=measured)
    if not mix_shapes:
        return
    progress(f"serve mix: {len(ev.runtimes)} variants x {len(mix_shapes)} new shapes, cold then warm")
    mix = serve_mix(ev.runtimes, {s: enc.fill(texts, s.batch, s.seq) for s in mix_shapes}, cfg.measure)
    for name, m in mix.items():
        ev.results[name].serve_mix = m
    within = {n: m for n, m in mix.items() if ev.results[n].ok}
    for name, why in serve_gate(within, cfg.measure.serve_floor, cfg.measure.stall_share).items():
        r = ev.results[name]
        r.ok, r.reason = False, f"{r.reason}; rejected: {why}"
        progress(f"rejected {name}: {why}")


def _write(cfg: OptimizeConfig, src: ModelSource, max_len: int, ev: VariantEvaluator, recovery: dict[str, Any],
           chosen: str, fidelity_texts: str, progress: Progress) -> Path:
    results = ev.results
    best = results[chosen]

    def fill(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        if best.runtime == "torch":  # the reference won (tiny models): ship the HF weights
            from millis.encoder.tasks import load_task_model
            load_task_model(src, cfg.task).hf.save_pretrained(tmp / "hf")
        else:
            vdir = Path(best.facts["dir"])
            for f in vdir.iterdir():
                shutil.copy2(f, tmp / f.name)
        AutoTokenizer.from_pretrained(str(src.path)).save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "millis_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "task": cfg.task, "output": OUTPUT_NAME[cfg.task], "input_names": list(src.input_names),
            "max_length": max_len, "id2label": {str(k): v for k, v in src.id2label.items()},
            "source": {"spec": src.spec, "path": str(src.path), "sha256": src.sha256,
                       "model_type": src.model_type, "layers": src.num_layers, "hidden": src.hidden_size,
                       "heads": src.num_heads, "pooling": to_dict(src.pooling)},
            "variant": {"name": best.name, "precision": best.precision, **best.recipe},
            "measured": {"target": cfg.target.name, "latency": best.latency, "fidelity": best.fidelity,
                         "accuracy": best.accuracy, "reference_accuracy": ev.ref_acc, "cold_start": best.cold_start,
                         "serve_mix": best.serve_mix,
                         "fidelity_texts": fidelity_texts},
            "hardware": hardware.describe(),
            "config": to_dict(cfg),
        }
        if "compressed" in best.recipe:  # a distilled / pruned student won: say which
            meta["compressed"] = best.recipe["compressed"]
        report.write_all(tmp, meta, [r.__dict__ for r in results.values()], chosen, recovery)
        return meta

    progress(f"writing artifact to {cfg.out}")
    return artifact.write(Path(cfg.out), fill)

"""`millis optimize`: build every variant, check fidelity, measure, select, write the artifact."""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from millis import __version__, artifact, hardware, report
from millis.config import OptimizeConfig, to_dict
from millis.errors import MillisError
from millis.fidelity import compare, within
from millis.measure import cold_start, measure, rss_mb
from millis.runtimes import open_runtime
from millis.select import Candidate, select
from millis.sources import ModelSource, resolve
from millis.tasks import OUTPUT_NAME
from millis.text import TextEncoder, read_texts
from millis.tiny import sample_texts
from millis.variants import REFERENCE, Builder, variants_for

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
    ok: bool = False
    reason: str = ""
    cold_start: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # shape name -> stats
    error: str = ""


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


def _outputs(rt, enc: TextEncoder, texts: list[str], batch: int = 8) -> np.ndarray:
    rows = []
    for i in range(0, len(texts), batch):
        rows.append(rt.run(enc.encode(texts[i:i + batch]).feeds)[rt.output_name])
    return np.concatenate(rows)


def optimize(cfg: OptimizeConfig, progress: Progress = lambda msg: None) -> Path:
    """Run the whole pipeline for `cfg`; return the artifact directory."""
    src = resolve(cfg.source)
    max_len = model_max_length(src, cfg.max_length)
    for s in cfg.measure.shapes + (cfg.target,):
        if s.seq > max_len:
            raise MillisError(f"shape {s.name} is longer than the model's max length {max_len}")
    enc = TextEncoder(src.path, src.input_names, max_len)
    texts = read_texts(cfg.sample_texts, limit=512) if cfg.sample_texts else sample_texts()  # fidelity set
    calib_texts = read_texts(cfg.calibration_texts, limit=512) if cfg.calibration_texts else texts
    calib_len = min(max_len, 128)  # one fixed length: Percentile / Entropy need equal shapes
    calib_enc = TextEncoder(src.path, src.input_names, calib_len)  # truncates at that length too
    calibration = functools.cache(lambda: [calib_enc.encode(calib_texts[i:i + 8], pad_to=calib_len).feeds
                                           for i in range(0, len(calib_texts), 8)])  # shared by int8 passes
    out_name = OUTPUT_NAME[cfg.task]
    shapes = tuple(dict.fromkeys(cfg.measure.shapes + (cfg.target,)))
    inputs = {s: enc.fill(texts, s.batch, s.seq) for s in shapes}

    work = Path(tempfile.mkdtemp(prefix="millis-work-"))
    try:
        builder = Builder(src, cfg.task, work, calibration)
        results: dict[str, VariantResult] = {}
        runtimes = {}
        ref_out = None
        for v in variants_for(cfg.variants, cfg.preset):
            progress(f"building {v.name}")
            r = VariantResult(v.name, v.runtime, v.precision, v.note,
                              {"runtime": v.runtime, "passes": list(v.passes), "options": dict(v.options)})
            results[v.name] = r
            try:
                t0 = time.perf_counter()
                vdir, r.facts = builder.build(v)
                r.facts["build_s"] = time.perf_counter() - t0
                rss0 = rss_mb()
                opts = dict(v.options, task=cfg.task, file=r.facts.get("file") or "")
                rt, load_s, first_s = cold_start(lambda: open_runtime(
                    v.runtime, vdir, v.name, src.input_names, out_name, opts, cfg.measure.threads),
                    inputs[cfg.target])
                r.cold_start = {"load_s": load_s, "first_call_s": first_s, "total_s": load_s + first_s}
                r.rss_mb = rss_mb() - rss0
                if getattr(rt, "effective_precision", ""):
                    r.facts["effective_precision"] = rt.effective_precision
                progress(f"checking fidelity of {v.name}")
                y = _outputs(rt, enc, texts)
                if v.name == REFERENCE:
                    ref_out = y
                r.fidelity = compare(cfg.task, ref_out, y)
                r.ok, r.reason = (True, "reference") if v.name == REFERENCE else within(cfg.task, r.fidelity, cfg.budget)
                r.facts["dir"] = str(vdir)
                runtimes[v.name] = rt
            except Exception as e:  # one variant failing (e.g. a runtime missing) must not sink the run
                if v.name == REFERENCE:
                    raise
                r.error, r.reason = f"{type(e).__name__}: {e}", "build or run failed"
                progress(f"skipped {v.name}: {r.error[:200]}")
        progress(f"measuring {len(runtimes)} variants x {len(shapes)} shapes")
        lat = measure(runtimes, inputs, cfg.measure,
                      on_round=lambda i: progress(f"measured round {i + 1}/{cfg.measure.rounds}"))
        for name, per_shape in lat.items():
            results[name].latency = per_shape
        chosen = select([Candidate(r.name, r.latency[cfg.target.name]["p50_ms"], r.ok, r.reason)
                         for r in results.values() if r.latency])
        progress(f"chosen: {chosen.name}")
        return _write(cfg, src, max_len, results, chosen.name, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(cfg: OptimizeConfig, src: ModelSource, max_len: int, results: dict[str, VariantResult],
           chosen: str, progress: Progress) -> Path:
    best = results[chosen]

    def fill(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        if best.runtime == "torch":  # the reference won (tiny models): ship the HF weights
            from millis.tasks import load_task_model
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
                         "cold_start": best.cold_start},
            "hardware": hardware.describe(),
            "config": to_dict(cfg),
        }
        report.write_all(tmp, meta, [r.__dict__ for r in results.values()], chosen)
        return meta

    progress(f"writing artifact to {cfg.out}")
    return artifact.write(Path(cfg.out), fill)

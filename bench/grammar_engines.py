"""Which grammar engine constrains millis's decoding: llguidance against outlines-core (xgrammar when
importable; on PyPI it requires triton and transformers), on SmolLM2's real 49,152-token vocabulary.

    .venv/bin/python bench/grammar_engines.py          # outlines-core: pip install outlines-core (not a dependency)

For a JSON schema (an object with a string, an integer, an enum and an array): compile time (schema ->
a ready matcher, 3 repeats, median), then a walk of --steps tokens. Each step computes the
allowed-token mask, as the boolean array over the vocabulary that sampling applies, and takes one
allowed token (a seeded RNG's choice among the first 50 allowed, the same rule for every engine):
median and max mask time. Writes bench/results/grammar_engines.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from millis.common.hardware import describe  # noqa: E402
from millis.gen.builtin import resolve_model  # noqa: E402
from millis.gen.gguf import read_gguf  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}, "city": {"enum": ["Paris", "Rome", "Oslo"]}},
    "required": ["name", "age", "tags", "city"], "additionalProperties": False}


def walk(compute, advance, allowed, steps: int, eos: int, seed: int) -> tuple[list[float], int]:
    rng, times, n = random.Random(seed), [], 0
    for _ in range(steps):
        t = time.perf_counter()
        mask = compute()
        times.append(time.perf_counter() - t)
        ids = allowed(mask)
        if not ids:
            break
        tok = rng.choice(ids[:50])
        n += 1
        if tok == eos:
            break
        advance(tok)
    return times, n


def llguidance_row(tok_json: str, vocab: int, eos: int, steps: int, seed: int) -> dict:
    import llguidance

    t = time.perf_counter()
    lt = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t
    compiles, walks = [], []
    for rep in range(3):
        t = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)), log_level=0)
        compiles.append(time.perf_counter() - t)
        bits = lambda: np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")  # noqa: E731
        times, n = walk(bits, m.consume_token, lambda b: np.nonzero(b[:vocab])[0].tolist(), steps, eos, seed + rep)
        walks += times
    import importlib.metadata as md
    return {"engine": "llguidance", "version": md.version("llguidance"), "tokenizer_s": setup,
            "compile_ms": 1e3 * statistics.median(compiles), "mask_ms_p50": 1e3 * statistics.median(walks),
            "mask_ms_max": 1e3 * max(walks), "tokens": n}


def outlines_row(tok_json: str, vocab: int, eos: int, steps: int, seed: int) -> dict:
    import outlines_core
    from tokenizers import Tokenizer

    t = time.perf_counter()
    voc: dict[str, list[int]] = {}
    for s, i in Tokenizer.from_str(tok_json).get_vocab().items():
        if i != eos:
            voc.setdefault(s, []).append(i)
    v = outlines_core.Vocabulary(eos, voc)
    setup = time.perf_counter() - t
    compiles, walks = [], []
    for rep in range(3):
        t = time.perf_counter()
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        guide = outlines_core.Guide(outlines_core.Index(regex, v))
        compiles.append(time.perf_counter() - t)
        def mask():  # the allowed ids as the boolean mask sampling needs (llguidance's unpacked bits)
            allowed = np.zeros(vocab, dtype=bool)
            allowed[np.asarray(guide.get_tokens(), dtype=np.int64)] = True
            return allowed

        times, n = walk(mask, guide.advance, lambda b: np.nonzero(b)[0].tolist(), steps, eos, seed + rep)
        walks += times
    import importlib.metadata as md
    return {"engine": "outlines-core", "version": md.version("outlines-core"), "tokenizer_s": setup,
            "compile_ms": 1e3 * statistics.median(compiles), "mask_ms_p50": 1e3 * statistics.median(walks),
            "mask_ms_max": 1e3 * max(walks), "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "grammar_engines.json"))
    a = ap.parse_args()
    g = read_gguf(resolve_model("builtin:smollm2"))
    tok_json, vocab, eos = g.tokenizer._tok.to_str(), g.config.vocab_size, g.config.eos_id
    rows, missing = [], {}
    for name, fn in (("llguidance", llguidance_row), ("outlines-core", outlines_row)):
        try:
            rows.append(fn(tok_json, vocab, eos, a.steps, a.seed))
        except ImportError as e:
            missing[name] = str(e)
    try:
        import xgrammar  # noqa: F401
        missing["xgrammar"] = "importable but not measured here"
    except ImportError:
        missing["xgrammar"] = "not installed (its wheel requires triton and transformers)"
    m = describe()
    print(f"{m.get('cpu')} ({', '.join(m.get('isa', []))}); SmolLM2 vocabulary {vocab}; JSON schema walk of {a.steps}")
    print(f"{'engine':14s} {'version':>8s} {'tokenizer s':>11s} {'compile ms':>10s} {'mask p50 ms':>11s} {'mask max':>8s}")
    for r in rows:
        print(f"{r['engine']:14s} {r['version']:>8s} {r['tokenizer_s']:11.2f} {r['compile_ms']:10.1f} "
              f"{r['mask_ms_p50']:11.3f} {r['mask_ms_max']:8.2f}")
    for k, v in missing.items():
        print(f"{k}: {v}")
    Path(a.out).write_text(json.dumps({"machine": m, "schema": SCHEMA, "rows": rows, "missing": missing,
                                       "command": "bench/grammar_engines.py " + " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

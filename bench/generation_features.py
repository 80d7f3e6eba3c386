"""Prefix caching and prompt-lookup speculation on the real chat model (builtin:smollm2), millis alone.

    .venv/bin/python bench/generation_features.py [--rounds 9] [--threads 2]

- ttft: a 512-token shared system prompt (tinyshakespeare text) followed by a short question. Time to
  first token (admission, prefill, first sample; b1) with the prefix cache off, against the same
  request when an earlier request with the same system prompt and another question left its blocks
  cached. Ratio = cached / uncached, median of per-round ratios (the systems alternate).
- speculate: 128 greedy tokens at b1, plain decoding against `--speculate 6` (prompt lookup), on an
  extraction prompt (copy a given passage) and on free-form chat, --spec-rounds (21: decode speed on
  this VM moves 10% between runs). Decode tokens/s after the first token; the ratio spec / plain per
  round, median; the text must be identical; acceptance of draft tokens.
- draft: the same two tasks with a draft model (`--draft-model`, `--speculate 4`): SmolLM2 cut to its first
  --draft-layers of 30 blocks (bench/gguf_files.py; no smaller SmolLM2 is offline), --draft-rounds rounds.
- json: --json-requests banking77 test messages (real customer-service text), each asked to be filed
  as JSON under a schema (topic enum, urgency, a short summary), sampled at temperature 0.7 with its
  own seed, b1: every answer must parse and validate (jsonschema). The same prompts without the
  constraint alternate with them; decode tokens/s after the first token, constrained / free.
Writes bench/results/generation_features.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import harness  # noqa: E402

from millis.common.hardware import describe  # noqa: E402
from millis.gen import EngineConfig, SamplingParams, chat_prompt, open_engine  # noqa: E402

QUESTIONS = ["Who speaks first in this scene?", "What does the second speaker want?", "Summarize it in a line.",
             "Which city is named?", "Is anyone angry?", "What happens next?", "Name two characters.",
             "What is the mood?"]


def first_token(eng, ids: list[int], max_tokens: int = 1) -> tuple[float, list[int], float]:
    """(seconds to the first token, all tokens, seconds from the first token to the last)."""
    t0 = time.perf_counter()
    rid = eng.add(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    got: list[int] = []
    t1 = None
    while eng.has_work:
        for o in eng.step():
            if o.id == rid and o.token_ids:
                got += o.token_ids
                t1 = t1 or time.perf_counter()
    return t1 - t0, got, time.perf_counter() - t1


def ttft_rows(model: str, threads: int, rounds: int, text: str) -> dict:
    cold = open_engine(model, EngineConfig(max_batch=1, max_seq=1024, threads=threads, prefix_cache=False))
    warm = open_engine(model, EngineConfig(max_batch=1, max_seq=1024, threads=threads))
    system = cold.tok.encode(text)[:512]
    first_token(warm, system + cold.tok.encode("\nQuestion: " + QUESTIONS[0]))  # leaves the 512 cached
    ratios, cold_ms, warm_ms = [], [], []
    for r in range(rounds):
        ids = system + cold.tok.encode("\nQuestion: " + QUESTIONS[1 + r % (len(QUESTIONS) - 1)])
        order = [(cold, cold_ms), (warm, warm_ms)][:: 1 if r % 2 == 0 else -1]
        for eng, out in order:
            out.append(1e3 * first_token(eng, ids)[0])
        ratios.append(warm_ms[-1] / cold_ms[-1])
    return {"system_tokens": len(system), "uncached_ms": statistics.median(cold_ms),
            "cached_ms": statistics.median(warm_ms), "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "hit_rate": warm.kv.hit_rate}


def spec_rows(model: str, threads: int, rounds: int, text: str, speculate: int = 6,
              draft_model: str = "") -> list[dict]:
    plain = open_engine(model, EngineConfig(max_batch=1, max_seq=1024, threads=threads))
    spec = open_engine(model, EngineConfig(max_batch=1, max_seq=1024, threads=threads, speculate=speculate,
                                           draft_model=draft_model))
    passage = text[2000:2600]
    chat = lambda msg: chat_prompt(plain, msg)  # noqa: E731
    tasks = {"extraction": chat(f"Copy the following passage exactly, word for word.\n\n{passage}"),
             "free-form": chat("Write a short story about a lighthouse keeper who finds a message in a bottle.")}
    rows = []
    for name, ids in tasks.items():
        tps = {"plain": [], "spec": []}
        ratios, texts = [], {}
        for r in range(rounds):
            order = [("plain", plain), ("spec", spec)][:: 1 if r % 2 == 0 else -1]
            for sys_name, eng in order:
                _, toks, dt = first_token(eng, ids, max_tokens=128)
                tps[sys_name].append((len(toks) - 1) / dt)
                texts[sys_name] = toks
            ratios.append(tps["spec"][-1] / tps["plain"][-1])
        d = spec.draft_stats
        rows.append({"task": name, "prompt_tokens": len(ids), "tokens": len(texts["plain"]),
                     "plain_tok_s": statistics.median(tps["plain"]), "spec_tok_s": statistics.median(tps["spec"]),
                     "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                     "identical": texts["plain"] == texts["spec"], "drafted": d.drafted, "accepted": d.accepted})
        spec.draft_stats.drafted = spec.draft_stats.accepted = 0
    return rows


TICKET = {"type": "object", "properties": {
    "topic": {"enum": ["card", "transfer", "payment", "account", "cash", "exchange", "other"]},
    "urgent": {"type": "boolean"}, "summary": {"type": "string", "maxLength": 80}},
    "required": ["topic", "urgent", "summary"], "additionalProperties": False}


MAX_JSON_TOKENS = 192  # the longest valid ticket: ~25 tokens of JSON around an 80-character summary, which
# may be 80 tokens (digits are one token each); an answer cut by max_tokens cannot be valid JSON


def run_text(eng, ids: list[int], params: SamplingParams) -> tuple[str, int, float]:
    """(text, tokens after the first, seconds after the first token)."""
    rid, text, n, t1 = eng.add(ids, params), "", 0, None
    while eng.has_work:
        for o in eng.step():
            if o.id == rid:
                text += o.text
                n += len(o.token_ids)
                t1 = t1 or time.perf_counter()
    return text, n - 1, time.perf_counter() - t1


def json_rows(model: str, threads: int, n: int) -> dict:
    import jsonschema

    from millis.gen.grammar import json_schema_grammar

    eng = open_engine(model, EngineConfig(max_batch=1, max_seq=1024, threads=threads))
    grammar = json_schema_grammar(TICKET)
    eng.grammars.matcher(grammar)  # the tokenizer's trie and the compiled grammar: once, before timing
    msgs = harness.banking77_spread(n)
    ok, tok, sec = 0, {"json": 0, "free": 0}, {"json": 0.0, "free": 0.0}
    failures = []
    for i, msg in enumerate(msgs):
        ids = chat_prompt(eng, f"File this customer message as a JSON ticket with topic, urgent and summary.\n\n{msg}")
        runs = [("json", grammar), ("free", "")][:: 1 if i % 2 == 0 else -1]
        for name, g in runs:
            text, k, dt = run_text(eng, ids, SamplingParams(max_tokens=MAX_JSON_TOKENS, temperature=0.7, seed=i,
                                                                    grammar=g))
            tok[name] += k
            sec[name] += dt
            if name == "json":
                try:
                    jsonschema.validate(json.loads(text), TICKET)
                    ok += 1
                except (ValueError, jsonschema.ValidationError) as e:
                    failures.append(f"{text!r}: {type(e).__name__}")
    tps = {k: tok[k] / sec[k] for k in tok}
    return {"requests": len(msgs), "valid": ok, "failures": failures[:5], "json_tok_s": tps["json"],
            "free_tok_s": tps["free"], "ratio": tps["json"] / tps["free"], "json_tokens": tok["json"],
            "free_tokens": tok["free"], "schema": TICKET}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--rounds", type=int, default=9, help="TTFT rounds")
    ap.add_argument("--spec-rounds", type=int, default=21, help="speculation rounds (decode speed is noisy here)")
    ap.add_argument("--draft-rounds", type=int, default=5)
    ap.add_argument("--draft-layers", type=int, default=8, help="the draft model: SmolLM2's first N blocks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-requests", type=int, default=200)
    ap.add_argument("--parts", default="ttft,speculate,draft,json", help="a subset updates those parts of --out")
    ap.add_argument("--out", default=str(HERE / "results" / "generation_features.json"))
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    text = (Path(harness.data_root()) / "tinyshakespeare" / "input.txt").read_text()
    text = text[int(len(text) * 0.9):]  # the held-out tail, as the perplexity bench
    t0 = time.time()
    everything = {"ttft", "speculate", "draft", "json"}
    out = json.loads(Path(a.out).read_text()) if parts != everything and Path(a.out).exists() else {}
    m = describe()
    print(f"{m.get('cpu')} ({', '.join(m.get('isa', []))}), {a.threads} threads, model {a.model}")
    if "ttft" in parts:
        ttft = out["ttft"] = ttft_rows(a.model, a.threads, a.rounds, text)
        print(f"ttft, {ttft['system_tokens']}-token cached prefix: uncached {ttft['uncached_ms']:.1f} ms, cached "
              f"{ttft['cached_ms']:.1f} ms, ratio {ttft['ratio']:.3f} [{ttft['ratio_range'][0]:.3f}-"
              f"{ttft['ratio_range'][1]:.3f}]")
    if "speculate" in parts:
        spec = out["speculate"] = spec_rows(a.model, a.threads, a.spec_rounds, text)
        print(f"{'task':12s} {'plain tok/s':>11s} {'spec tok/s':>10s} {'x':>6s} {'identical':>9s} {'accepted':>14s}")
        for r in spec:
            print(f"{r['task']:12s} {r['plain_tok_s']:11.1f} {r['spec_tok_s']:10.1f} {r['ratio']:6.2f} "
                  f"{r['identical']!s:>9s} {r['accepted']:6d}/{r['drafted']:<6d}")
    if "draft" in parts:
        import gguf_files  # noqa: E402 -- the draft file is built on first use

        path = gguf_files.smollm2_draft(a.draft_layers)
        rows = spec_rows(a.model, a.threads, a.draft_rounds, text, speculate=4, draft_model=path)
        out["draft_model"] = {"layers": a.draft_layers, "of": 30, "speculate": 4, "rows": rows}
        print(f"draft model: SmolLM2's first {a.draft_layers} of 30 blocks, --speculate 4")
        for r in rows:
            print(f"{r['task']:12s} {r['plain_tok_s']:11.1f} {r['spec_tok_s']:10.1f} {r['ratio']:6.2f} "
                  f"{r['identical']!s:>9s} {r['accepted']:6d}/{r['drafted']:<6d}")
    if "json" in parts:
        js = out["json_schema"] = json_rows(a.model, a.threads, a.json_requests)
        print(f"json_schema: {js['valid']}/{js['requests']} parse and validate; decode {js['json_tok_s']:.1f} tok/s "
              f"constrained vs {js['free_tok_s']:.1f} free, ratio {js['ratio']:.3f}")
    command = "bench/generation_features.py " + " ".join(sys.argv[1:])
    out.update({"machine": m, "threads": a.threads, "model": a.model, "rounds": a.rounds,
                "spec_rounds": a.spec_rounds, "commands": {**out.get("commands", {}), **{p: command for p in parts}},
                "seconds": {**(out.get("seconds") if isinstance(out.get("seconds"), dict) else {}),
                            a.parts: round(time.time() - t0)}})
    out.pop("command", None)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

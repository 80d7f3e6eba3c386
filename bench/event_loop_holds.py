"""How long one request's answer holds the generation server's event loop, per step of its work, before and
after the streaming scans and the logprobs bodies were made incremental (docs/serving.md, "From a review"):

  tool-call stream   a constrained answer streamed 4 characters a token: per token, the content so far and
                     the calls' deltas. `rescan` is what every token cost before (a fresh scan of the whole
                     answer: a Scan over the text as a str, the same reader with nothing kept); `incremental`
                     the answer's own growing Scan, as respond.events keeps it now.
  logprobs body      a non-streamed answer of 2,048 tokens with 20 alternatives each (chat and completions;
                     pieces decoded by the embedded MiniLM's tokenizer): built at once (before) against a
                     slice of LOGPROBS_SLICE tokens between two loop turns (each id decoded once per answer).
Reported: total seconds of loop time per answer and the longest single hold (ms).

    PYTHONPATH=. .venv/bin/python bench/event_loop_holds.py [--out bench/results/event_loop_holds_<cpu>.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from checkouts import write_result  # noqa: E402
from millis.common.hardware import describe  # noqa: E402
from millis.serve.generation.logprobs import LOGPROBS_SLICE, logprobs_body  # noqa: E402
from millis.serve.generation.tool_formats import GENERIC, HERMES, LLAMA3  # noqa: E402
from millis.serve.generation.tool_stream import CallStream, Scan  # noqa: E402


def answers() -> dict[str, tuple]:
    args = json.dumps({"items": [f"x{i}" for i in range(3000)]}, separators=(",", ":"))
    return {"generic call, 3,000-item array": (GENERIC, '{"tool_calls":[{"name":"f","arguments":' + args + "}]}"),
            "llama3 call, 3,000-item array": (LLAMA3, '<|python_tag|>{"name":"f","parameters":' + args + "}"),
            "hermes, 400 parallel calls": (HERMES, "".join(
                '<tool_call>\n{"name":"f","arguments":%s}\n</tool_call>\n' % json.dumps({"i": list(range(i % 7))})
                for i in range(400))),
            "generic response, 25,000 characters": (GENERIC, '{"response":' + json.dumps(
                'caf\u00e9 \U0001F600 "ok"\n ' * 800) + "}")}


def stream(fmt, text: str, incremental: bool) -> tuple[float, float]:
    scan, calls, total, worst = Scan(), CallStream(), 0.0, 0.0
    for i in range(0, len(text), 4):
        t0 = time.perf_counter()
        scan.extend(text[i:i + 4])
        what = scan if incremental else scan.s
        fmt.content_so_far(what, True)
        calls.update(fmt.spans(what))
        dt = time.perf_counter() - t0
        total, worst = total + dt, max(worst, dt)
    return total, worst


def tokenizer():
    """A real tokenizer's per-id decode (the embedded MiniLM's WordPiece): what each piece costs to decode."""
    from transformers import AutoTokenizer

    from millis.encoder.source import resolve

    return AutoTokenizer.from_pretrained(resolve("builtin:minilm").path)


def logprobs(chat: bool, sliced: bool, tok) -> tuple[float, float]:
    rng = random.Random(0)
    es = [(rng.randrange(30000), -rng.random(), [(rng.randrange(30000), -rng.random()) for _ in range(20)])
          for _ in range(2048)]
    step = LOGPROBS_SLICE if sliced else len(es)
    pieces: dict = {}
    total, worst = 0.0, 0.0
    for k in range(0, len(es), step):
        t0 = time.perf_counter()
        logprobs_body(chat, es[k:k + step], tok, pieces)
        dt = time.perf_counter() - t0
        total, worst = total + dt, max(worst, dt)
    return total, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for name, (fmt, text) in answers().items():
        for how in ("rescan", "incremental"):
            gc.collect()
            total, worst = stream(fmt, text, how == "incremental")
            rows.append({"work": f"tool-call stream: {name}", "how": how, "chars": len(text),
                         "loop_s": round(total, 4), "longest_hold_ms": round(worst * 1e3, 3)})
    tok = tokenizer()
    for chat in (True, False):
        for how in ("at once", "sliced"):
            gc.collect()  # the garbage of the runs before is not this run's pause
            total, worst = logprobs(chat, how == "sliced", tok)
            rows.append({"work": f"logprobs body, {'chat' if chat else 'completions'}, 2,048 tokens x 20",
                         "how": how, "chars": 0, "loop_s": round(total, 4), "longest_hold_ms": round(worst * 1e3, 3)})
    print(f"{'work':58s} {'how':12s} {'loop s':>8s} {'longest hold ms':>16s}")
    for r in rows:
        print(f"{r['work']:58s} {r['how']:12s} {r['loop_s']:8.3f} {r['longest_hold_ms']:16.3f}")
    if a.out:
        write_result(a.out, {"bench": "event_loop_holds", "machine": describe(), "rows": rows})


if __name__ == "__main__":
    main()

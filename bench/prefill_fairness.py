"""A short request behind a long prompt: what it waits. `millis serve builtin:smollm2 --threads 1` (the CPU
prefill budget, 256 prompt tokens a step) for this tree and each --code checkout, the trees alternated round by
round, each a server process of its own: one request with a ~4,000-token prompt (max_tokens 1), then 0.5 s
later a 5-token request with a short prompt. Before 2026-12-07 the short one waited for the long prompt's whole
prefill; since, while a request waits, a part-way prompt takes at most half the budget a step and a waiting prompt
that fits the other half starts (millis/gen/scheduling.py).

    .venv/bin/python bench/prefill_fairness.py --code before=<a checkout> [--rounds 3] --out bench/results/prefill_fairness_zen4.json

Prints a table (medians over rounds) and writes the JSON with the CPU it ran on.
"""
from __future__ import annotations

import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from checkouts import tree_rows, trees_compared, write_result

FLAGS = ("--threads", "1", "--max-batch", "4")
LONG = "The quick brown fox jumps over the lazy dog near the river bank. " * 300  # ~4,000 tokens


def post(port: int, body: dict) -> tuple[int, float, dict]:
    """(status, seconds to the answer, its usage)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    took = time.perf_counter() - t0
    c.close()
    return r.status, took, (json.loads(data).get("usage", {}) if r.status == 200 else {})


def one_round(tree: Path) -> dict:
    from millis.loadgen.process import ServerProcess

    # the tree's millis first on the path (python -m would put the working directory, this tree, before PYTHONPATH)
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from millis.cli.main import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "serve", "builtin:smollm2", "--host", "127.0.0.1", "--port", "0", *FLAGS]
    s = ServerProcess(cmd, ready_timeout=300)
    try:
        post(s.port, {"prompt": "Hi", "max_tokens": 2, "temperature": 0})  # the first call's one-off costs
        big: dict = {}
        hog = threading.Thread(target=lambda: big.update(r=post(s.port, {"prompt": LONG, "max_tokens": 1,
                                                                          "temperature": 0})))
        hog.start()
        time.sleep(0.5)
        st, short_s, _ = post(s.port, {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "temperature": 0})
        hog.join()
        return {"short_status": st, "short_s": short_s, "long_status": big["r"][0], "long_s": big["r"][1],
                "long_prompt_tokens": big["r"][2].get("prompt_tokens")}
    finally:
        s.stop()


def main() -> None:
    from millis.common.hardware import describe

    a, trees, runs = trees_compared(__doc__, 3, "bench/results/prefill_fairness.json", one_round)
    print(f"{'tree':<10} {'short request s':>16} {'long request s':>15} {'long prompt tokens':>19}")
    rows = tree_rows(trees, runs, lambda rs: {k: statistics.median(r[k] for r in rs) for k in ("short_s", "long_s")})
    for row in rows:
        med, tokens = row["median"], row["rounds"][0]["long_prompt_tokens"]
        print(f"{row['tree']:<10} {med['short_s']:>16.2f} {med['long_s']:>15.2f} {tokens!s:>19}")
    write_result(a.out, {"bench": "prefill_fairness", "machine": describe(), "flags": FLAGS, "rows": rows})


if __name__ == "__main__":
    main()

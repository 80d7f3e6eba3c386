"""A generation server whose KV pool one request could fill: what the others wait. `millis serve builtin:smollm2`
with a small pool (--kv-memory-mb 64: 1,440 positions), for this tree and each --code checkout, the trees
alternated round by round, each a server process of its own:

- hog: one request of max_tokens near the pool (1,430), then 0.5 s later a 5-token one: the short one's latency;
- n2: one streamed request with n = 2 and max_tokens 1,000: when each choice's first event comes.

    .venv/bin/python bench/kv_pressure.py --code before=<a checkout> [--rounds 2] --out bench/results/kv_pressure_zen4.json

Prints a table (medians over rounds) and writes the JSON with the CPU it ran on. Before 2026-12-06 admission
reserved prompt + max_tokens of the pool; since, blocks are taken as tokens are written, the latest request
preempted when the pool is full (docs/generation.md).
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

FLAGS = ("--threads", "1", "--max-batch", "4", "--kv-memory-mb", "64", "--max-queue", "8", "--max-inputs", "4")


def post(port: int, body: dict, stream: bool = False) -> tuple[int, float, dict[int, float]]:
    """(status, seconds to the whole answer, {choice: seconds to its first event} when streamed)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}), {"Content-Type": "application/json"})
    r = c.getresponse()
    first: dict[int, float] = {}
    if stream:
        for line in r:
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    first.setdefault(ch["index"], time.perf_counter() - t0)
    else:
        r.read()
    c.close()
    return r.status, time.perf_counter() - t0, first


def one_round(tree: Path) -> dict:
    from millis.loadgen.process import ServerProcess

    # the tree's millis first on the path (python -m would put the working directory, this tree, before PYTHONPATH)
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from millis.cli.main import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "serve", "builtin:smollm2", "--host", "127.0.0.1", "--port", "0", *FLAGS]
    s = ServerProcess(cmd, ready_timeout=300)
    try:
        big: dict = {}
        hog = threading.Thread(target=lambda: big.update(r=post(s.port, {"prompt": "Once upon a time",
                                                                          "max_tokens": 1430, "ignore_eos": True,
                                                                          "temperature": 0})))
        hog.start()
        time.sleep(0.5)
        st, short_s, _ = post(s.port, {"prompt": "Hello", "max_tokens": 5, "temperature": 0})
        hog.join()
        st2, _, first = post(s.port, {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "n": 2,
                                      "temperature": 0}, stream=True)
        return {"short_status": st, "short_s": short_s, "hog_status": big["r"][0], "hog_s": big["r"][1],
                "n2_status": st2, "n2_first_s": [first.get(0), first.get(1)]}
    finally:
        s.stop()


def main() -> None:
    from millis.common.hardware import describe

    a, trees, runs = trees_compared(__doc__, 2, "bench/results/kv_pressure.json", one_round)
    print(f"{'tree':<10} {'5-token request s':>18} {'n=2 first events s':>22}")
    rows = tree_rows(trees, runs, lambda rs: {
        "short_s": statistics.median(r["short_s"] for r in rs),
        "n2_first_s": [statistics.median(r["n2_first_s"][k] for r in rs) for k in (0, 1)]})
    for row in rows:
        med = row["median"]
        print(f"{row['tree']:<10} {med['short_s']:>18.2f} {med['n2_first_s'][0]:>10.2f} {med['n2_first_s'][1]:>10.2f}")
    write_result(a.out, {"bench": "kv_pressure", "machine": describe(), "flags": FLAGS, "rows": rows})


if __name__ == "__main__":
    main()

"""Issue 13's robustness figures for both servers, from real models, in one run:

1. fuzzing: schemathesis from each server's /openapi.json (millis.loadgen.fuzz), over 2,000
   generated requests per server: no 5xx, no schema violation, invalid data refused;
2. poison pills against the generation server: four greedy requests (bystanders) run with and
   without each poison sent at the same moment, alternated round by round; the bystanders must
   all succeed, and their median latency with the poison must stay within 1.5x of without.

Encoder: the default artifact of `millis optimize builtin:minilm --task embed` (built once under
bench/.cache). Generation: stories260K (llama2.c) from ../shared/models. Writes
bench/results/serve_hardening.json.

    .venv/bin/python bench/serve_hardening.py [--examples 2000] [--rounds 7] [--encoder ARTIFACT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from millis.common.hardware import describe  # noqa: E402
from millis.loadgen.fuzz import fuzz  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_ARTIFACT = HERE / ".cache" / "artifacts" / "minilm-default"
STORY = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird"]
GREEDY = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}
POISONS = {  # what issue 13 sent, and the largest requests the server now accepts of each kind
    "top_k 2**63 (refused)": {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 1,
                              "top_k": 9223372036854775808},
    "16 stops x 30,000 chars (refused)": {"prompt": "Once", "max_tokens": 20, "stop": ["x" * 30000] * 16},
    "16 stops x 256 chars (max allowed)": {"prompt": "Once upon a time", "max_tokens": 48,
                                           "stop": ["a" * 255 + "b"] * 16, "ignore_eos": True},
    "100k-char prompt (refused before tokenizing)": {"prompt": "Once upon a time " * 6000, "max_tokens": 5},
    "4k-char prompt (tokenized, over context)": {"prompt": "a b " * 1000, "max_tokens": 5},
    "top_k 2**31-1, seeded (max allowed)": {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 1,
                                            "top_k": 2 ** 31 - 1, "seed": 3, "ignore_eos": True},
}


def models_dir() -> Path:
    data = os.environ.get("MILLIS_DATA")
    return Path(data).parent / "models" if data else HERE.parent.parent / "shared" / "models"


def default_artifact() -> Path:
    if not (DEFAULT_ARTIFACT / "millis.json").exists():
        subprocess.run([sys.executable, "-m", "millis.cli", "optimize", "builtin:minilm", "--task", "embed",
                        "--out", str(DEFAULT_ARTIFACT)], check=True)
    return DEFAULT_ARTIFACT


def run_fuzz(s: ServerProcess, name: str, examples: int, positive: bool, workdir: Path) -> dict:
    t0 = time.time()
    r = fuzz(s.url, workdir / name, examples, seed=2026, positive=positive, timeout_s=3000)
    out = {"server": name, "generated": r.generated, "unique_failures": r.failures, "passed": r.ok,
           "positive_acceptance_checked": positive, "seconds": round(time.time() - t0, 1)}
    if not r.ok:
        out["report_tail"] = r.output[-4000:]
    print(f"fuzz {name}: {r.generated} requests, {r.failures} failures, {'PASS' if r.ok else 'FAIL'}", flush=True)
    return out


def bystanders(s: ServerProcess, poison: dict | None) -> tuple[list[float], list[int], int]:
    """(bystander latencies s, bystander statuses, poison status) with everything sent at once."""
    def timed(body):
        t0 = time.perf_counter()
        status = s.post("/v1/completions", body)[0]
        return time.perf_counter() - t0, status

    with ThreadPoolExecutor(len(STORY) + 1) as pool:
        futs = [pool.submit(timed, {"prompt": p, **GREEDY}) for p in STORY]
        bad = pool.submit(s.post, "/v1/completions", poison) if poison else None
        res = [f.result() for f in futs]
        return [r[0] for r in res], [r[1] for r in res], bad.result()[0] if bad else 0


def run_poisons(s: ServerProcess, rounds: int) -> list[dict]:
    rows = []
    bystanders(s, None)  # warm
    for name, poison in POISONS.items():
        clean, dirty, statuses, poison_status = [], [], [], set()
        for r in range(rounds):
            for with_poison in ((False, True) if r % 2 == 0 else (True, False)):
                lat, st, ps = bystanders(s, poison if with_poison else None)
                (dirty if with_poison else clean).extend(lat)
                statuses += st
                if with_poison:
                    poison_status.add(ps)
        ratio = statistics.median(dirty) / statistics.median(clean)
        ok = set(statuses) == {200} and ratio <= 1.5
        rows.append({"poison": name, "poison_status": sorted(poison_status),
                     "bystander_statuses": sorted(set(statuses)),
                     "bystander_p50_ms_without": round(statistics.median(clean) * 1e3, 1),
                     "bystander_p50_ms_with": round(statistics.median(dirty) * 1e3, 1), "ratio": round(ratio, 3),
                     "target": "all bystanders 200, ratio <= 1.5", "met": ok})
        print(f"{name:45s} poison {sorted(poison_status)}  bystanders {sorted(set(statuses))}  "
              f"p50 {rows[-1]['bystander_p50_ms_without']:7.1f} -> {rows[-1]['bystander_p50_ms_with']:7.1f} ms "
              f"x{ratio:.2f} {'met' if ok else 'NOT MET'}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="schemathesis examples per operation")
    ap.add_argument("--rounds", type=int, default=7, help="alternated rounds per poison")
    ap.add_argument("--encoder", default="", help="encoder artifact (default: built from builtin:minilm)")
    ap.add_argument("--workdir", default="/tmp/millis-hardening")
    ap.add_argument("--out", default=str(RESULTS / "serve_hardening.json"))
    a = ap.parse_args()
    work = Path(a.workdir)
    enc_art = Path(a.encoder) if a.encoder else default_artifact()
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "machine": describe(),
              "fuzz": [], "poison": []}
    s = ServerProcess(serve_command(enc_art, "--threads", "1", "--model-name", "minilm"))
    try:
        result["fuzz"].append(run_fuzz(s, "encoder (minilm default artifact)", a.examples, True, work))
    finally:
        result["encoder_exit"] = s.stop()
    s = ServerProcess(serve_command(models_dir() / "stories260K", "--threads", "1", "--model-name", "stories",
                                    "--max-batch", "8"))
    try:
        result["poison"] = run_poisons(s, a.rounds)
        result["fuzz"].append(run_fuzz(s, "generation (stories260K)", a.examples, False, work))
    finally:
        result["generation_exit"] = s.stop()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

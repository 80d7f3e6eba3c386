"""Cold start of an encoder artifact, from this checkout and from each --code checkout, alternated run by run,
each run a fresh process:

  load_run_s   `python -c "import millis; m = millis.load(ART); m.run([text])"`: process start to the first
               answer (interpreter, imports, verify, weights packed for this CPU, tokenizer, one forward)
  ready_s      `millis serve ART` (--threads 2): process start to GET /ready answering 200 (warm-up included)
  imports      which of torch / transformers / onnxruntime / openvino the first kind of run imported

    .venv/bin/python bench/encoder_startup.py --model artifacts/minilm [--runs 7] [--code before=/tmp/millis-before]
        [--out bench/results/encoder_startup_<cpu>.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from millis.common.hardware import cpu_flags, describe  # noqa: E402
from millis.loadgen.process import HOST, ServerProcess  # noqa: E402

sys.path.insert(0, str(HERE))
from checkouts import add_code_flag, checkouts, write_result  # noqa: E402

HEAVY = ("torch", "transformers", "onnxruntime", "openvino")
LOAD_RUN = ("import sys; sys.path.insert(0, CODE); import millis; m = millis.load(ART); m.run(['where is my card?']); "
            "print('IMPORTS', ','.join(k for k in HEAVY if k in sys.modules))")


def load_run(code: Path, art: Path) -> tuple[float, str]:
    src = LOAD_RUN.replace("CODE", repr(str(code))).replace("ART", repr(str(art))).replace("HEAVY", repr(HEAVY))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, cwd=str(code), timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"load from {code} failed: {r.stderr[-2000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("IMPORTS")][-1]
    return wall, line[len("IMPORTS"):].strip()


def ready(code: Path, art: Path) -> float:
    boot = f"import runpy, sys; sys.path[0] = {str(code)!r}; runpy.run_module('millis.cli', run_name='__main__')"
    srv = ServerProcess([sys.executable, "-c", boot, "serve", str(art), "--host", HOST, "--port", "0",
                         "--threads", "2"], ready_timeout=300)
    try:
        return srv.ready_s
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/minilm", help="an artifact directory (make demo writes this one)")
    ap.add_argument("--runs", type=int, default=7)
    add_code_flag(ap)
    ap.add_argument("--out", default=str(HERE / "results" / "encoder_startup.json"))
    a = ap.parse_args()
    art = Path(a.model).resolve()
    if not (art / "millis.json").is_file():
        ap.error(f"{art} is not an artifact (no millis.json): run make demo, or millis optimize")
    systems = {"here": ROOT, **checkouts(ap, a.code)}
    for code in systems.values():  # kernels built, files in the page cache, before anything is timed
        load_run(code, art)
    runs: dict[str, dict[str, list]] = {n: {"load_run_s": [], "ready_s": [], "imports": []} for n in systems}
    for r in range(a.runs):
        for name, code in (systems.items() if r % 2 == 0 else reversed(systems.items())):
            wall, imports = load_run(code, art)
            runs[name]["load_run_s"].append(round(wall, 3))
            runs[name]["imports"].append(imports)
            runs[name]["ready_s"].append(round(ready(code, art), 3))
            print(f"run {r} {name}: load+run {wall:.2f} s, ready {runs[name]['ready_s'][-1]:.2f} s, "
                  f"imports [{imports}]", flush=True)
    table = {n: {k: round(statistics.median(v[k]), 3) for k in ("load_run_s", "ready_s")} | {"imports": v["imports"][0]}
             for n, v in runs.items()}
    print(f"\n{'system':<10}{'load+run s':>12}{'ready s':>10}  imports")
    for n, row in table.items():
        print(f"{n:<10}{row['load_run_s']:>12.2f}{row['ready_s']:>10.2f}  {row['imports'] or '-'}")
    meta = json.loads((art / "millis.json").read_text())
    out = {"bench": "encoder_startup", "model": str(a.model), "variant": meta["variant"]["name"], "runs": a.runs,
           "medians": table, "per_run": runs, "machine": describe(), "cpu_flags": sorted(cpu_flags()),
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    write_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RSS MB: the resident memory one variant takes, measured in a fresh process.

Measured inside the optimize process, the figure meant little: the first variant of each runtime is opened once
untimed (its imports are not its cold start), freed and opened again, and the second open reuses the pages the first
freed (RSS delta ~0); any variant opened after a build or another variant freed memory reused some of it too
(MiniLM ort-fp32: 47 MB one run, 115 MB another). A fresh process for each variant has nothing to reuse: it imports
the runtime's module, then the figure is what opening the variant and one call at the target shape add (the runtime's
one-off setup, its thread pools and arenas, included: a server pays it too).

    main() < pickle of {"open": open_runtime's arguments, "feeds": one batch}
prints {"rss_mb": ..., "peak_mb": ...} as JSON (peak: the most resident at once, the load's transient included).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

PROBE_TIMEOUT_S = 300.0  # a probe past this gives no figure; the variant is judged all the same


def resident_mb() -> float:
    """This process's resident set size in MiB (VmRSS)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb() -> float:
    """The most this process has held resident (ru_maxrss: KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def runtime_module(kind: str) -> str:
    """The Python module a runtime kind's class lives in (imported before the baseline: it is not the variant's)."""
    return {"onnxruntime": "millis.runtimes.ort", "openvino": "millis.runtimes.openvino",
            "torch": "millis.runtimes.torch_eager", "native": "millis.runtimes.native",
            "cuda": "millis.runtimes.cuda"}.get(kind, "millis.runtimes.registry")


def probe(open_args: tuple, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Import the runtime, then open the variant and run `feeds` once: what that added to the resident set."""
    import importlib

    from millis.runtimes.registry import open_runtime

    importlib.import_module(runtime_module(open_args[0]))
    if open_args[0] == "torch":  # transformers imports its model classes on first use: not the variant's either
        import transformers.modeling_utils  # noqa: F401
    base = resident_mb()
    rt = open_runtime(*open_args)
    rt.run(feeds)
    return {"rss_mb": round(resident_mb() - base, 1), "peak_mb": round(max(0.0, peak_mb() - base), 1)}


def footprint_mb(open_args: tuple, feeds: dict[str, np.ndarray],
                 timeout_s: float = PROBE_TIMEOUT_S) -> tuple[float | None, str]:
    """(RSS MB the variant adds to a fresh process that imported its runtime, or None; why None). `open_args`: what
    millis.runtimes.registry.open_runtime takes. None for a GPU variant, unsaid: its memory is the GPU's, and a second
    process would capture its CUDA graphs again."""
    if open_args[0] == "cuda":
        return None, ""
    root = str(Path(__file__).resolve().parents[2])  # the child imports this millis, not one in its working directory
    code = f"import sys; sys.path.insert(0, {root!r}); from millis.optimize.footprint import main; sys.exit(main())"
    try:
        done = subprocess.run([sys.executable, "-c", code],
                              input=pickle.dumps({"open": open_args, "feeds": feeds}), capture_output=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"RSS probe: {type(e).__name__}"
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode or not lines:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return None, f"RSS probe failed: {tail[0][:200]}"
    try:
        return float(json.loads(lines[-1])["rss_mb"]), ""
    except (ValueError, KeyError, TypeError):
        return None, f"RSS probe said {lines[-1][:200]!r}"


def main() -> int:
    job: dict[str, Any] = pickle.loads(sys.stdin.buffer.read())
    print(json.dumps(probe(tuple(job["open"]), job["feeds"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

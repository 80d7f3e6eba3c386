"""The runner side of the peer protocol shared by runner.py (encoders) and gen_runner.py (generation).

stdout carries JSON lines only: one {"ok":true,"ready":true,...} after prepare (or {"ok":false,...}
and exit 1), then one reply per request line until {"cmd":"quit"}. Errors in a request are replied
and the runner keeps serving. Stdlib only: every runner lives in its own venv.
"""
import argparse, gc, json, os, sys, time, traceback
from importlib import metadata


def threads_from_argv() -> None:
    """OpenMP-based libraries read their thread count at import: set it from --threads first."""
    if "--threads" in sys.argv:
        n = sys.argv[sys.argv.index("--threads") + 1]
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(v, n)


def registry():
    """A {name: runner class} dict and the `@system(name)` decorator that fills it."""
    systems = {}

    def system(name):
        def deco(cls):
            systems[name] = cls
            return cls
        return deco
    return systems, system


def arg_parser(systems) -> argparse.ArgumentParser:
    """The flags every runner takes: --system (one of `systems`), --model-dir, --work-dir, --threads."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", required=True, choices=sorted(systems))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def versions(*pkgs) -> dict:
    """Python's version and each package's installed version (None: not installed)."""
    out = {"python": sys.version.split()[0]}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def timed_ms(call, n: int) -> list[float]:
    """Wall-clock ms of each of n calls of `call()`, the garbage collector off (no collector pauses
    inside the timed calls; the same for every system)."""
    ms, pc = [], time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            t0 = pc()
            call()
            ms.append((pc() - t0) * 1e3)
    finally:
        gc.enable()
    return ms


def serve(make, handle, label: str) -> int:
    """`make()` builds and prepares the system; `handle(system, request, prep_s)` answers a request."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        s = make()
    except BaseException as e:  # prep failed: report and exit so the harness records a skip
        traceback.print_exc()
        reply({"ok": False, "error": f"prepare failed: {type(e).__name__}: {e}"[:2000]})
        return 1
    prep_s = time.perf_counter() - t0
    print(f"[peer] {label} ready in {prep_s:.1f}s", file=sys.stderr, flush=True)
    reply({"ok": True, "ready": True, "system": label.split()[0], "prep_s": prep_s})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req.get("cmd") == "quit":
                reply({"ok": True})
                return 0
            reply(handle(s, req, prep_s))
        except Exception as e:
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
    return 0

"""Where the time goes: ONNX Runtime's profiler per op type for millis's ORT variants.

    .venv/bin/python bench/profile_ort.py [--source builtin:minilm] [--shape b1xs128]

Builds the fused fp32, Attention-only int8 and full int8 variants, runs each `--calls` times at
the shape with ORT profiling on, and prints the share of kernel time per op type. Writes
bench/results/profile_ort.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

VARIANTS = ("ort-fp32-fused", "ort-int8-attention", "ort-int8-dynamic-pc")


def profile(model_path: Path, feeds: dict, calls: int, threads: int) -> dict[str, float]:
    """Mean microseconds per call for each op type (kernel time only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    s = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        s.run(None, feeds)
    trace = Path(s.end_profiling())  # drop warm-up events: start a fresh profile
    so.profile_file_prefix = str(trace.with_name("ort2"))
    s = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    for _ in range(calls + 1):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    return {k: v / (calls + 1) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main() -> int:
    from millis.common.config import Shape
    from millis.encoder.source import resolve
    from millis.encoder.text import TextEncoder
    from millis.common.samples import sample_texts
    from millis.optimize.build.variants import CATALOG, Builder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="builtin:minilm")
    ap.add_argument("--shape", default="b1xs128")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    src, shape = resolve(a.source), Shape.parse(a.shape)
    enc = TextEncoder(src.path, src.input_names, 512)
    feeds = enc.fill(sample_texts(), shape.batch, shape.seq)
    out = {}
    with tempfile.TemporaryDirectory() as work:
        b = Builder(src, "embed", Path(work), lambda: [])
        for name in VARIANTS:
            vdir, facts = b.build(CATALOG[name])
            out[name] = profile(vdir / facts["file"], feeds, a.calls, a.threads)
    ops = sorted({op for v in out.values() for op in v}, key=lambda op: -max(v.get(op, 0) for v in out.values()))
    print(f"{a.source} {shape.name}: mean kernel time per call, us (share)")
    print(f"{'op type':28}" + "".join(f"{n:>26}" for n in VARIANTS))
    for op in ops:
        cells = []
        for n in VARIANTS:
            us, total = out[n].get(op, 0.0), sum(out[n].values())
            cells.append(f"{us:10.0f} ({100 * us / total:4.1f}%)" if us else "-")
        print(f"{op:28}" + "".join(f"{c:>26}" for c in cells))
    print(f"{'total':28}" + "".join(f"{sum(out[n].values()):>26.0f}" for n in VARIANTS))
    res = HERE / "results" / "profile_ort.json"
    res.write_text(json.dumps({"source": a.source, "shape": shape.name, "threads": a.threads,
                               "us_per_call_by_op": out}, indent=2))
    print(f"wrote {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

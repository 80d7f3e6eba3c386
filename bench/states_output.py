"""What the token-states output (TEI's /embed_all) costs the pooled calls of millis's ONNX Runtime / OpenVINO variants.

    .venv/bin/python bench/states_output.py [--models minilm,bert-base] [--variants ort-fp32-fused,...]
        [--rounds 7] [--out bench/results/states_output.json]

An embedder's exported graph has two outputs since 2026-12-07: the pooled `embedding` and `token_states` (B, T, H).
ONNX Runtime runs only the nodes a fetch needs; OpenVINO computes every output of its compiled model. Per variant
(`millis.optimize.build.variants.Builder`, the graphs `millis optimize` builds), the graph as built ("two") is timed
against the same graph with the states' output dropped ("one": the nodes only it reads pruned; for OpenVINO a model
of the first result alone), both fetching `embedding` alone, compiled with the runtimes' own settings (2 threads,
OpenVINO LATENCY with one stream), at b1xs16, b1xs128 and b8xs128; alternated in every round (one first in even
rounds, two in odd ones); the ratio is the median over rounds of two's p50 / one's, with its range. MiniLM: real
weights; bert-base: BERT-base's shape, random weights (bench/peers/models.py). Writes JSON (`rows`; `meta`: the
machine and ISA) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from peers.models import bert_base_dir, minilm_dir  # noqa: E402

from millis.common import hardware  # noqa: E402

SHAPES = ((1, 16), (1, 128), (8, 128))


def feeds(B: int, T: int) -> dict[str, np.ndarray]:
    ids = np.full((B, T), 1000, np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def callers(vdir: Path, variant: str, threads: int) -> dict:
    """{"two": the graph as built, "one": without the states' output}: each a function of feeds fetching the
    embedding."""
    from millis.encoder.source import STATES_NAME

    onnx_file = next(vdir.rglob("*.onnx"), None)
    if onnx_file is not None:
        import onnx
        import onnxruntime as ort

        from millis.optimize.build.graph import prune

        m = onnx.load(str(onnx_file))
        assert [o.name for o in m.graph.output] == ["embedding", STATES_NAME], onnx_file
        kept = [o for o in m.graph.output if o.name != STATES_NAME]
        del m.graph.output[:]
        m.graph.output.extend(kept)
        prune(m)
        one = onnx_file.with_name("one.onnx")
        onnx.save(m, str(one))
        out = {}
        for tag, path in (("one", one), ("two", onnx_file)):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            out[tag] = (lambda s: lambda fd: s.run(["embedding"], fd))(s)
        return out
    import openvino as ov

    xml = next(vdir.rglob("*.xml"))
    core, out = ov.Core(), {}
    for tag in ("one", "two"):
        m = core.read_model(str(xml))
        assert len(m.get_results()) == 2, xml
        if tag == "one":
            m = ov.Model([m.get_results()[0]], m.get_parameters())
        m.reshape({p.output(0).get_any_name(): ov.PartialShape([-1, -1]) for p in m.get_parameters()})
        prec = "bf16" if variant.endswith("bf16") else "f32"
        c = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY",
                                          "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})
        r = c.create_infer_request()
        out[tag] = (lambda r: lambda fd: r.infer(fd, share_inputs=True))(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--variants", default="ort-fp32-fused,ort-int8-dynamic-pc,ov-fp32,ov-bf16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "states_output.json"))
    a = ap.parse_args()
    from millis.encoder.source import resolve
    from millis.optimize.build.variants import CATALOG, Builder

    rows: list[dict] = []
    res = {"meta": {"command": "python bench/states_output.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"), "hardware": hardware.describe()}, "rows": rows}
    work = HERE / ".cache" / "states_output"
    for model in a.models.split(","):
        src = resolve(str(minilm_dir() if model == "minilm" else bert_base_dir()))
        shutil.rmtree(work / model, ignore_errors=True)
        builder = Builder(src, "embed", work / model, calibration=lambda: [])
        for variant in a.variants.split(","):
            vdir, _ = builder.build(CATALOG[variant])
            runs = callers(vdir, variant, a.threads)
            for B, T in SHAPES:
                fd = feeds(B, T)
                for fn in runs.values():
                    for _ in range(3):
                        fn(fd)
                n = max(4, 2048 // (B * T))
                p50 = {"one": [], "two": []}
                for rnd in range(a.rounds):
                    for tag in ("one", "two") if rnd % 2 == 0 else ("two", "one"):
                        ts = []
                        for _ in range(n):
                            t0 = time.perf_counter()
                            runs[tag](fd)
                            ts.append(time.perf_counter() - t0)
                        p50[tag].append(float(np.median(ts)) * 1e3)
                ratios = [t / o for t, o in zip(p50["two"], p50["one"])]
                row = {"model": model, "variant": variant, "shape": f"b{B}xs{T}",
                       "one_p50_ms": float(np.median(p50["one"])), "two_p50_ms": float(np.median(p50["two"])),
                       "ratio": float(np.median(ratios)), "range": [min(ratios), max(ratios)], "calls": n,
                       "rounds": p50}
                rows.append(row)
                print(f"{model:10s} {variant:20s} {row['shape']:8s} one {row['one_p50_ms']:9.3f} ms  two "
                      f"{row['two_p50_ms']:9.3f} ms  two/one {row['ratio']:.3f} [{min(ratios):.2f}-{max(ratios):.2f}]",
                      flush=True)
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

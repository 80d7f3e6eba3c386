"""GPU encoder benchmark: HF eager fp32 / fp16, HF + torch.compile(reduce-overhead), the whole HF model
in one CUDA graph, and millis's CUDA-graph runtime, in one run, on the lent GPU.

    PYTHONPATH=. python3 bench/gpu_encoders.py [--out DIR_OR_FILE] [--models bert-base,minilm]

Models have random weights from a BertConfig: bert-base (12 x 768, classify) and minilm (6 x 384,
12 heads, FFN 1536; embed, mean pooling + L2). Inputs fill exactly b x s tokens (full mask). Systems
are timed round-robin (3 rounds, the order rotating) after a warm-up; each call is bracketed by CUDA
events (`p50_ms`, `p99_ms`: device time, inputs already on the GPU) and a host clock with a sync
(`wall_*`); `e2e_*` is numpy in -> numpy out (host->device copy, forward, device->host copy: for
millis, CudaGraphRuntime.run). `rel_err` is ||out - ref|| / ||ref|| against HF eager fp32 on the
same inputs. `cold_start_s` runs in a fresh process with an empty Triton cache: load a saved
BERT-base directory -> all default buckets captured. Also written: a cuBLAS GEMM probe at the
layer's shapes with the bytes floor beside it, an SDPA probe, and a kernel profile of millis.
Writes $OUT/gpu_encoders_<gpu>.json (e.g. gpu_encoders_h200.json; or --out FILE.json) and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_probes import bandwidth_tbs, gemm_probe, gpu_slug, kernel_profile, sdpa_probe  # noqa: E402
from gpu_research.layers import research_encoder  # noqa: E402
from millis.common.config import Shape  # noqa: E402
from millis.encoder.source import Pooling  # noqa: E402

MODELS = {  # name -> (layers, hidden, heads, intermediate, task)
    "bert-base": (12, 768, 12, 3072, "classify"),
    "minilm": (6, 384, 12, 1536, "embed"),
}
SHAPES = ("b1xs16", "b1xs128", "b32xs128")
# the H200 targets, ms: (model, shape, p50 target, the millis systems that may meet it)
FP = ("millis-fp16", "millis-bf16", "millis-fp16-dense")
TARGETS = (("bert-base", "b1xs128", 0.40, FP), ("bert-base", "b1xs128", 0.30, ("millis-int8", "millis-fp8")),
           ("minilm", "b1xs128", 0.12, None), ("bert-base", "b32xs128", 1.2, None))  # None: any millis system
COLD_TARGET_S = 30.0
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MILLIS = {  # system -> CudaGraphRuntime options; "layer": a research layer of bench/gpu_research/layers.py
    "millis-fp16": dict(dtype="fp16", fuse="triton"),
    "millis-fp16-triton-gemm": dict(dtype="fp16", layer="triton-gemm"),  # gpu_research/gemm.py at small M
    "millis-fp16-gelu-tanh": dict(dtype="fp16", layer="gelu-tanh"),  # approximate GELU in the GEMM epilogue
    "millis-bf16": dict(dtype="bf16", fuse="triton"),
    "millis-fp16-torch-epilogues": dict(dtype="fp16", fuse="torch"),
    "millis-fp16-compile-epilogues": dict(dtype="fp16", layer="compile"),  # Inductor fuses the epilogues
    "millis-fp16-dense": dict(dtype="fp16", fuse="triton", dense=True),  # + unmasked graphs (flash)
    "millis-int8": dict(dtype="fp16", fuse="triton", gemm="int8"),  # W8A8 GEMMs (millis.gpu.w8a8), tuned at load
    "millis-fp8": dict(dtype="fp16", fuse="triton", gemm="fp8"),
}


def hf_model(name: str, dtype=torch.float32):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    layers, hidden, heads, inter, task = MODELS[name]
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, num_labels=4)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = BertForSequenceClassification(cfg) if task == "classify" else BertModel(cfg, add_pooling_layer=False)
    return m.eval().to(dtype)


def task_model(hf, name: str):
    from millis.encoder.tasks import TaskModel

    task = MODELS[name][4]
    return TaskModel(hf, task, Pooling(normalize=True) if task == "embed" else Pooling(), INPUTS).eval()


def make_inputs(shape: Shape, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    ids = g.integers(1000, vocab, size=(shape.batch, shape.seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


# ---- timing ----

def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class Cell:
    """Samples of one system at one (model, shape)."""

    def __init__(self, fn, e2e):
        self.fn, self.e2e = fn, e2e      # fn(): device tensors in, device out; e2e(): numpy in, numpy out
        self.dev, self.wall, self.e2e_wall = [], [], []

    def time(self, n: int) -> None:
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            self.fn()
            e.record()
            e.synchronize()
            self.wall.append((time.perf_counter() - t0) * 1e3)
            self.dev.append(s.elapsed_time(e))
        for _ in range(max(5, n // 4)):
            t0 = time.perf_counter()
            self.e2e()
            self.e2e_wall.append((time.perf_counter() - t0) * 1e3)

    def row(self) -> dict:
        return {"p50_ms": pct(self.dev, 50), "p99_ms": pct(self.dev, 99), "wall_p50_ms": pct(self.wall, 50),
                "wall_p99_ms": pct(self.wall, 99), "e2e_p50_ms": pct(self.e2e_wall, 50),
                "e2e_p99_ms": pct(self.e2e_wall, 99), "n": len(self.dev)}


def iters_for(fn, budget_s: float, lo: int = 30, hi: int = 600) -> int:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 3
    return int(min(hi, max(lo, budget_s / max(per, 1e-6))))


# ---- systems: each returns (device step, e2e step, output for fidelity, extra row keys) ----

def dev_inputs(feeds):
    return [torch.from_numpy(feeds[n]).cuda() for n in INPUTS]


def host_call(model, feeds):
    def e2e():
        with torch.inference_mode():
            return model(*dev_inputs(feeds)).float().cpu().numpy()
    return e2e


def eager_system(model, feeds):
    x = dev_inputs(feeds)

    def fn():
        with torch.inference_mode():
            return model(*x)
    return fn, host_call(model, feeds), {}


def compile_system(compiled, feeds):
    x = dev_inputs(feeds)

    def fn():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            return compiled(*x)
    t0 = time.perf_counter()
    for _ in range(3):  # compile + cudagraph-tree warm-up / record
        fn()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0

    def e2e():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            return compiled(*dev_inputs(feeds)).float().cpu().numpy()
    return fn, e2e, {"compile_s": round(compile_s, 2)}


def hf_graph_system(model, feeds):
    """HF's model captured whole. The bench's feeds have no padding, so it is captured without
    attention_mask (the same outputs): transformers may read the mask on the host, which a capture
    cannot do, and a failed capture is not retried in the same process (the CUDA context may be left
    unusable), at this shape or a later one: it fails this system alone."""
    static = dev_inputs(feeds)
    if not feeds["attention_mask"].all():
        raise RuntimeError("hf-graph-fp16 runs unpadded feeds only")
    args = (static[0], None, static[2])
    note = {"note": "captured without attention_mask (no padding)"}
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(*args)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(*args)

    fresh = dev_inputs(feeds)  # each call copies its inputs into the static buffers, as millis does

    def fn():
        for d, x in zip(static, fresh):
            d.copy_(x)
        g.replay()
        return out

    def e2e():
        for d, x in zip(static, dev_inputs(feeds)):
            d.copy_(x)
        g.replay()
        return out.float().cpu().numpy()
    return fn, e2e, note


def millis_system(rt, feeds):
    x = dev_inputs(feeds)
    # the bench's inputs have no padding: full=True lets a dense runtime replay its unmasked graph
    return (lambda: rt.forward(*x, full=True)), (lambda: rt.run(feeds)[rt.output_name]), {}


# ---- cold start (a fresh process) ----

COLD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from millis.runtimes.cuda import CudaGraphRuntime, DEFAULT_BUCKETS
from millis.common.config import Shape
buckets = DEFAULT_BUCKETS if sys.argv[2] == "default" else tuple(Shape.parse(s) for s in sys.argv[2].split(","))
rt = CudaGraphRuntime(sys.argv[1], "millis-fp16", ("input_ids", "attention_mask", "token_type_ids"), "logits",
                      "classify", buckets=buckets)
print(json.dumps({"cold_start_s": rt.cold_start_s, "graphs": rt.graphs, "process_s": time.perf_counter() - t0,
                  "gpu_mem_gb": torch.cuda.max_memory_reserved() / 1e9}))
"""


def cold_start(model_dir: Path, buckets: str, fresh_cache: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if fresh_cache:
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    r = subprocess.run([sys.executable, "-c", COLD, str(model_dir), buckets], env=env, capture_output=True,
                       text=True, timeout=300)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    try:  # its last line is the JSON it printed; anything else is reported, not raised
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no JSON on the last line of: {r.stdout[-500:]!r}"}
    return {**out, "buckets": buckets, "fresh_triton_cache": fresh_cache}


# ---- main ----

def run_model(name: str, shapes: list[Shape], systems: list[str], rounds: int, budget_s: float,
              rows: list[dict], extra: dict, save=lambda: None) -> None:
    """One model's cells: each system at each shape, alternated; `save` is called once a shape's rows are in
    `rows` (and again after the kernel profiles in `extra`), so a time box that ends the run keeps them."""
    from millis.runtimes.cuda import CudaGraphRuntime
    from millis.encoder.tasks import OUTPUT_NAME

    task = MODELS[name][4]
    hf32 = hf_model(name)
    m32 = task_model(hf32, name)
    m16 = task_model(copy.deepcopy(hf32).half(), name)
    vocab = hf32.config.vocab_size
    compiled = torch.compile(m16, mode="reduce-overhead", dynamic=False) if "hf-compile-fp16" in systems else None
    runtimes = {}
    for s in systems:
        if s in MILLIS:
            pooling = Pooling(normalize=True) if task == "embed" else Pooling()
            opts = dict(MILLIS[s])
            layer = opts.pop("layer", None)
            t0 = time.perf_counter()
            model = research_encoder(hf32, task, pooling, layer, opts["dtype"]) if layer else hf32
            rt = CudaGraphRuntime(model, s, INPUTS, OUTPUT_NAME[task], task, pooling, buckets=tuple(shapes), **opts)
            runtimes[s] = rt
            load_s = time.perf_counter() - t0  # encoder build + graph capture (rt.cold_start_s for hf32)
            extra.setdefault("load_s", {})[f"{s}/{name}"] = round(load_s, 2)
            if rt.tuned:  # W8A8: every candidate's time per (format, N, K, rows)
                extra.setdefault("w8a8_tuning", {})[f"{s}/{name}"] = [
                    {"key": list(k), "us": [[c, round(us, 2)] for c, us in v]} for k, v in rt.tuned.items()]
            print(f"  {s} {name}: loaded + {rt.graphs} graphs in {load_s:.1f} s", flush=True)
    refused: dict[str, str] = {}  # system -> why it is not run at the shapes left
    for shape in shapes:
        feeds = make_inputs(shape, vocab)
        with torch.inference_mode():
            ref = m32(*dev_inputs(feeds)).float().cpu().numpy()
        cells, notes = {}, {}
        for s in systems:
            if s in refused:  # a capture failed at an earlier shape: no second capture in this process
                rows.append({"system": s, "model": name, "shape": shape.name, "error": refused[s]})
                continue
            try:
                if s == "hf-eager-fp32":
                    fn, e2e, note = eager_system(m32, feeds)
                elif s == "hf-eager-fp16":
                    fn, e2e, note = eager_system(m16, feeds)
                elif s == "hf-compile-fp16":
                    fn, e2e, note = compile_system(compiled, feeds)
                elif s == "hf-graph-fp16":
                    fn, e2e, note = hf_graph_system(m16, feeds)
                else:
                    fn, e2e, note = millis_system(runtimes[s], feeds)
                out = e2e()
                note["rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                cells[s], notes[s] = Cell(fn, e2e), note
            except Exception as e:
                rows.append({"system": s, "model": name, "shape": shape.name,
                             "error": f"{type(e).__name__}: {e}"[:300]})
                if s == "hf-graph-fp16":
                    refused[s] = f"not run: its capture failed at {shape.name}"
                print(f"  {s} {name} {shape.name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        n = {s: iters_for(c.fn, budget_s / rounds) for s, c in cells.items()}
        for r in range(rounds):
            order = list(cells)[r % len(cells):] + list(cells)[:r % len(cells)]
            for s in order:
                cells[s].time(n[s])
        for s, c in cells.items():
            row = {"system": s, "model": name, "shape": shape.name, **c.row(), **notes[s]}
            rows.append(row)
            print(f"  {name:9s} {shape.name:9s} {s:30s} p50 {row['p50_ms']:8.3f}  p99 {row['p99_ms']:8.3f}  "
                  f"wall {row['wall_p50_ms']:8.3f}  e2e {row['e2e_p50_ms']:8.3f}  err {row['rel_err']:.1e}", flush=True)
        save()  # this shape's rows, before the next shape and before the profiles below
    for s in ("millis-fp16", "millis-int8"):  # BERT-base's kernels: fp16, and W8A8 (slower than fp16 on the H200)
        if name == "bert-base" and s in runtimes:
            for sh in shapes:
                try:
                    prof = kernel_profile(runtimes[s], make_inputs(sh, vocab))
                except Exception as e:  # noqa: BLE001 -- a profiler that fails costs its figure, not the run
                    prof = [{"error": f"{type(e).__name__}: {e}"[:300]}]
                extra.setdefault("profile", {})[f"{s}/{name}/{sh.name}"] = prof
            save()
    del runtimes, compiled, m16, m32, hf32
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def targets(rows: list[dict], cold_s) -> list[dict]:
    out = []
    for model, shape, ms, systems in TARGETS:
        mine = [r for r in rows if r["model"] == model and r["shape"] == shape and "p50_ms" in r
                and (r["system"] in systems if systems else r["system"].startswith("millis"))]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["p50_ms"])
        out.append({"model": model, "shape": shape, "target_ms": ms, "systems": systems or "any millis",
                    "met": best["p50_ms"] <= ms, "best_variant": best["system"],
                    "best_p50_ms": round(best["p50_ms"], 3), "best_rel_err": best.get("rel_err")})
    if cold_s is not None:
        out.append({"cold_start_s": round(cold_s, 2), "target_s": COLD_TARGET_S, "met": cold_s <= COLD_TARGET_S})
    return out


def print_table(rows: list[dict]) -> None:
    print("\n| model | shape | system | p50 ms | p99 ms | wall p50 | e2e p50 | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['shape']} | {r['system']} | error: {r['error'][:60]} |")
            continue
        print(f"| {r['model']} | {r['shape']} | {r['system']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
              f"{r['wall_p50_ms']:.3f} | {r['e2e_p50_ms']:.3f} | {r['rel_err']:.1e} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base")  # BERT-base's kernel profiles last: run 2's box ended at MiniLM
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--systems",
                    default="hf-eager-fp32,hf-eager-fp16,hf-compile-fp16,hf-graph-fp16," + ",".join(MILLIS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5, help="timed seconds per system and cell (all rounds)")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    out = Path(a.out)
    out = out / f"gpu_encoders_{gpu_slug(torch.cuda.get_device_name())}.json" if out.suffix != ".json" else out
    import transformers
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the reference
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": [], "method": __doc__.strip()}
    t_start = time.perf_counter()
    if not a.no_cold_start:  # first, while the Triton cache is empty
        d = Path(tempfile.mkdtemp(prefix="bert-base-"))
        m = hf_model("bert-base")
        m.save_pretrained(d)
        del m
        torch.cuda.empty_cache()
        cs = [cold_start(d, "default", fresh_cache=True), cold_start(d, "default", fresh_cache=False),
              cold_start(d, ",".join(SHAPES), fresh_cache=False)]
        result["cold_start"] = cs
        result["cold_start_s"] = cs[0].get("cold_start_s")
        print(f"cold start (BERT-base, default buckets, empty Triton cache): {json.dumps(cs)}", flush=True)
    extra: dict = {}
    shapes = [Shape.parse(s) for s in a.shapes.split(",")]
    systems = a.systems.split(",")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps({**result, **extra}, indent=1))

    for m in a.models.split(","):
        run_model(m, shapes, systems, a.rounds, a.seconds, result["rows"], extra, save)
        save()
    result.update(extra)
    if not a.no_probes:
        bw = bandwidth_tbs()
        result["copy_bandwidth_tbs"] = round(bw, 2)
        result["gemm_probe"] = gemm_probe(bw)
        result["sdpa_probe"] = sdpa_probe()
        print("copy bandwidth TB/s:", round(bw, 2))
        for r in result["gemm_probe"]:
            print("  gemm", r)
        for r in result["sdpa_probe"]:
            print("  sdpa", r)
    result["targets"] = targets(result["rows"], result.get("cold_start_s"))
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    out.write_text(json.dumps(result, indent=1))
    for k, v in result.get("profile", {}).items():
        print(f"\nprofile {k} (us per forward):")
        for r in v[:14]:
            print(f"  {r['us_per_forward']:8.2f}  x{r['per_call']:<3d} {r['kernel']}" if "error" not in r
                  else f"  {r['error']}")
    print_table(result["rows"])
    print("\ntargets (the best p50 of the millis systems each target allows):")
    for t in result["targets"]:
        print(f"  {json.dumps(t)}")
    print(f"\nwrote {out} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

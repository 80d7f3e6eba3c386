"""`millis serve --device cuda` over loopback on the lent GPU: BERT-base classifier (random weights,
the bert-base-uncased shape), HTTP round trip at concurrency 1, 4, 16 against the same model called
in process. Run on the device from the repo root (see docs/gpu.md):

    PYTHONPATH=. python3 bench/gpu_serve.py --tokenizer .gpu_carry/tokenizer --texts .gpu_carry/texts.txt --out $OUT
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from millis.common.readers import read_texts  # noqa: E402
from millis.loadgen import request_maker  # noqa: E402
from millis.loadgen.client import Conn, Target  # noqa: E402
from millis.loadgen.load import Level, run_level, warm  # noqa: E402
from millis.loadgen.process import ServerProcess, serve_command  # noqa: E402
from gpu_probes import gpu_slug  # noqa: E402
from request_rounds import STAGES, http_round  # noqa: E402


MODEL, SMOKE_MODEL = "bert-base (random), classify", "2 x 64 BERT (random, the smoke run), classify"


def build_bert_base(out: Path, tokenizer: Path, small: bool = False) -> Path:
    """BERT-base's shape (small: 2 layers x 64, the CPU smoke run's, its code path the same)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if small else {}
    cfg = BertConfig(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                     **shape)
    BertForSequenceClassification(cfg).save_pretrained(out)
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--calls", type=int, default=2000, help="in-process calls timed back to back (half as many paced)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cuda", help="cuda; cpu: a smoke run of the script itself (a 2-layer BERT)")
    a = ap.parse_args()
    import torch

    from gpu_probes import cuda_or_smoke

    cuda = cuda_or_smoke(a.device)
    if cuda is None:
        return 2

    import millis.artifact.model as api

    model_dir = build_bert_base(Path(tempfile.mkdtemp(prefix="millis-bert-base-cls-")), Path(a.tokenizer),
                                small=a.device == "cpu")
    texts = read_texts(a.texts)

    # in process: the same runtime and buckets the server captures (its defaults: rows and the token budget)
    from millis.serve.config import ServeConfig

    serve = ServeConfig()
    t0 = time.perf_counter()
    model = api.open_model(model_dir, device=a.device, max_batch=serve.max_batch,
                           max_batch_tokens=serve.max_batch_tokens)
    cold = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    for t in texts[:min(200, a.calls)]:
        model.run([t])
    lat = []
    for _ in range(a.calls):
        x = texts[rng.integers(len(texts))]
        s = time.perf_counter()
        model.run([x])
        lat.append(time.perf_counter() - s)
    # the same calls 0.5 ms apart, as an HTTP round trip spaces them: on the Zen 4 VM a CPU forward after such a
    # pause took 1.1-1.5x its back-to-back time (docs/serving.md); this tells whether a GPU call does too
    paced = []
    for _ in range(a.calls // 2):
        x = texts[rng.integers(len(texts))]
        time.sleep(0.0005)
        s = time.perf_counter()
        model.run([x])
        paced.append(time.perf_counter() - s)
    inproc = {"p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
              "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
              "paced_p50_ms": round(float(np.percentile(paced, 50)) * 1e3, 3),
              "cold_start_s": round(cold, 2), "graphs": getattr(model.runtime, "graphs", 0)}
    print("in process", inproc, flush=True)
    del model
    if cuda:
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    res = {"bench": "gpu_serve", "device": gpu, "torch": torch.__version__, "model": MODEL if cuda else SMOKE_MODEL,
           "texts": "banking77 test, 1 per request", "in_process": inproc}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_serve_{gpu_slug(gpu)}.json"  # as committed: _h100
    # the in-process figures first: a server that fails to start or a time box that ends the loads keeps them
    path.write_text(json.dumps(res, indent=2) + "\n")

    try:
        srv = ServerProcess(serve_command(model_dir, "--device", a.device, "--model-name", "bert-base"))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        res["server_error"] = str(e)[:500]
        path.write_text(json.dumps(res, indent=2) + "\n")
        return 1
    url, ready_s = srv.url, srv.ready_s
    res["server_ready_s"] = round(ready_s, 2)

    async def loads():
        t = Target(url)
        make = request_maker(t, "/v1/classify", "bert-base", texts, 1, 0)
        await warm(t, make, 300, 10)
        levels = [await run_level(t, make, Level("closed", c, f"c{c}"), a.duration, 0, 10) for c in (1, 4, 16)]
        # concurrency 1 again on one keep-alive connection, with the server's own stage times (its
        # x-millis-queue / tokenize / inference-ms headers): where the HTTP path's time goes
        conn = await Conn.connect(t)
        bodies = [t.request_bytes("POST", "/v1/classify", json.dumps({"model": "bert-base", "inputs": [x]}).encode())
                  for x in texts[:2000]]
        ms, stages = [], {s: [] for s in STAGES}
        try:
            await http_round(conn, bodies, a.duration, np.random.default_rng(1), ms, stages)
        finally:
            conn.close()
        c1 = {"p50_ms": round(float(np.median(ms)), 3),
              "server_stages_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()}}
        return levels, c1

    try:
        rows, c1_stages = asyncio.run(loads())
    finally:  # whatever the loads did: a server child left running holds the GPU's memory past this part
        exit_code = srv.stop()
        res["sigterm_exit"] = exit_code
        path.write_text(json.dumps(res, indent=2) + "\n")
    res.update({"rows": [dict(system="millis-serve-cuda", **r) for r in rows],
                "c1_overhead_ms": round(rows[0]["p50_ms"] - inproc["p50_ms"], 3), "c1_one_connection": c1_stages})
    for r in rows:
        print(f"{r['load']:>5}: {r['rps']:9.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
              f"errors {r['errors']}")
    print("c1 on one connection, with the server's stages:", c1_stages)
    print(f"HTTP c1 p50 {rows[0]['p50_ms']} ms vs in process {inproc['p50_ms']} ms; ready in {ready_s:.1f} s; "
          f"SIGTERM exit {exit_code}")
    path.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

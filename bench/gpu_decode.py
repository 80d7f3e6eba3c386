"""SmolLM2-135M-Instruct (its GGUF, dequantized to bf16) decoding on a GPU through millis's engine:
the issue-20 figures a generation bench does not give. Run on the device from the repo root:

    PYTHONPATH=.:bench/.gpu_carry/py python3 bench/gpu_decode.py --gguf bench/.gpu_carry/smollm2.gguf --out $OUT

- cold start: open_engine (read, dequantize, load to the GPU, capture every decode graph);
- b1 decode ms/token: the median step of a greedy request (16-token prompt, N new tokens, EOS ignored),
  each step's host sync included (what a client sees), prefill excluded; b8 tokens/s the same way;
- TTFT at 512 prompt tokens: the first step of a 512-token prompt (an eager prefill);
- kernels per decode step: CUDA kernels of one b1 step, counted by torch.profiler on the graph's eager twin;
- greedy agreement: leading tokens of 3 chat prompts (32 new) equal to the CPU fp32 path's (the same
  file dequantized to fp32 on the device's CPU, MILLIS_NO_KERNELS: the torch model);
- HTTP inter-token latency at concurrency 1 (`millis serve FILE --device cuda --dtype bf16`, one streamed
  completion) against the in-process step.
Writes $OUT/gpu_decode_<gpu>.json and prints the figures after every section (a time box keeps what came before).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is."]


def steps_ms(eng, prompt: list[int], n: int, rows: int = 1) -> list[float]:
    """Wall time of each engine step (ms) while `rows` greedy requests decode n tokens each."""
    from millis.gen import SamplingParams

    for _ in range(rows):
        eng.add(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    out = []
    while eng.has_work:
        t = time.perf_counter()
        eng.step()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def alternated(a, prompt: list[int], switch: str, names: tuple[str, str], rounds: int = 6) -> dict:
    """b1 ms/token of two batch-1 engines on a.gguf, the second opened with `switch`=1 (an A/B variable read
    while the engine opens and captures), alternated like systems: {name: {b1_ms_per_token, rounds, per_layer,
    per_layer_after, layer_us}}. Each engine decides at load whether it runs one kernel a layer (from its own
    timing of the layers both ways, GraphedDecode.layer_us), so what each one ran is recorded beside its
    figure: per_layer as opened, and after the rounds (a barrier that gave up while decoding turns it off)."""
    from millis.gen import EngineConfig, open_engine

    cfg = EngineConfig(max_batch=1, max_seq=1024, dtype=a.dtype, device=a.device)
    engines = {names[0]: open_engine(a.gguf, cfg)}
    os.environ[switch] = "1"
    try:
        engines[names[1]] = open_engine(a.gguf, cfg)
    finally:
        del os.environ[switch]

    def decode_of(k: str):
        return getattr(engines[k], "decode", None)

    opened = {k: bool(getattr(decode_of(k), "per_layer", False)) for k in engines}
    ms: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(rounds):
        for k in list(engines)[r % 2:] + list(engines)[:r % 2]:
            ms[k].append(statistics.median(steps_ms(engines[k], prompt, a.new_tokens)[1:]))
    return {k: {"b1_ms_per_token": round(statistics.median(v), 4), "rounds": [round(x, 4) for x in v],
                "per_layer": opened[k], "per_layer_after": bool(getattr(decode_of(k), "per_layer", False)),
                "layer_us": getattr(decode_of(k), "layer_us", None)}
            for k, v in ms.items()}


def safe_alternated(a, prompt: list[int], switch: str, names: tuple[str, str]) -> dict:
    """alternated, or the error it raised (an A/B that fails costs its figure, not the results after it)."""
    import torch

    try:
        return alternated(a, prompt, switch, names)
    except Exception as e:  # noqa: BLE001 -- reported in the results
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        torch.cuda.empty_cache()


def layer_ab_validity(ab: dict) -> dict:
    """The per-layer A/B compares one kernel a layer with five only if its first engine kept one kernel a layer
    (it re-decides from its own, noisy, timing of the layers at load) and its second did not: else it measured
    five kernels against five. -> {"valid": bool, "invalid_because": str | None}."""
    if "error" in ab:
        return {"valid": False, "invalid_because": "the A/B raised"}
    one, five = ab["per_layer"], ab["five_kernels"]
    why = None
    if not one["per_layer"]:
        why = f"the per_layer engine chose five kernels a layer at load (its layer_us: {one['layer_us']})"
    elif not one["per_layer_after"]:
        why = "the per_layer engine left one kernel a layer while decoding (a barrier gave up)"
    elif five["per_layer"]:
        why = "the five_kernels engine ran one kernel a layer (MILLIS_NO_DECODE_LAYER not read)"
    return {"valid": why is None, "invalid_because": why}


def decode_figures(eng, prompt: list[int], n: int) -> dict:
    """b1 ms/token and b8 tokens/s (median decode step; the first step, the prefill, left out) and the TTFT
    of a 512-token prompt (median of 3), after a warm-up request."""
    steps_ms(eng, prompt, 8)
    b1 = statistics.median(steps_ms(eng, prompt, n)[1:])
    b8 = statistics.median(steps_ms(eng, prompt, n, rows=8)[1:])  # the first step prefills all 8
    out = {"b1_ms_per_token": round(b1, 4), "b8_tokens_per_s": round(8 * 1e3 / b8, 1),
           "ttft_512_ms": ttft_512(eng, prompt)}
    if getattr(eng, "prefill", None) is not None:  # the A/B of the prefill graphs, on the same engine
        graphs, eng.prefill = eng.prefill, None
        out["ttft_512_ms_eager_prefill"] = ttft_512(eng, prompt)
        eng.prefill = graphs
    g = getattr(getattr(eng, "decode", None), "graphs", {})
    if g:  # the b1 step's device time alone (its graph replayed back to back): the rest of b1 is the host's
        import torch

        eng.decode.pos[1].fill_(eng.decode.max_seq - 1)  # the scratch position: no request's cache is written
        one = g[min(k for k in g if k[0] == 1)]
        one.replay()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            one.replay()
        b.record()
        b.synchronize()
        out["b1_graph_ms"] = round(a.elapsed_time(b) / 50, 4)
        out["b1_host_ms"] = round(b1 - out["b1_graph_ms"], 4)
    return out


def ttft_512(eng, prompt: list[int]) -> float:
    """The first token of a 512-token prompt (the prompt repeated), median of 3 (ms)."""
    long = (prompt * (512 // len(prompt) + 1))[:512]
    return round(statistics.median([steps_ms(eng, long, 1)[0] for _ in range(3)]), 3)


def kernels_per_step(eng) -> int:
    return step_profile(eng, calls=1)["kernels"]


def safe_step_profile(eng) -> dict:
    """step_profile, or the error it raised: a profiler that fails costs its figure, not the run's results."""
    try:
        return step_profile(eng)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def step_profile(eng, calls: int = 20) -> dict:
    """The batch-1 decode step's kernels, from `calls` eager steps at the scratch position (what a replay
    launches): their count, the sum of their device times, and the costliest by name (us a step). The
    replay's time less that sum is what the launches between kernels cost."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gd = eng.decode
    gd.pos[1].fill_(gd.max_seq - 1)
    with torch.inference_mode():
        gd._forward(1, gd.lengths[0])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                gd._forward(1, gd.lengths[0])
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name[:80], []).append(e.device_time_total if hasattr(e, "device_time_total")
                                                    else e.cuda_time_total)
    top = sorted(({"kernel": k, "per_step": len(v) // calls, "us_per_step": round(sum(v) / calls, 2)}
                  for k, v in by_name.items()), key=lambda r: -r["us_per_step"])
    return {"kernels": len(events) // calls, "kernel_us_sum": round(sum(sum(v) for v in by_name.values()) / calls, 1),
            "top": top[:15]}


def http_itl(gguf: str, prompt: str, n: int, device: str, dtype: str) -> dict:
    """Gaps between streamed chunks of one completion from `millis serve` on the GPU (ms)."""
    import http.client

    from millis.loadgen.process import ServerProcess, serve_command

    srv = ServerProcess(serve_command(gguf, "--device", device, "--dtype", dtype, "--max-batch", "8",
                                      "--max-seq", "1024"))
    host, port = srv.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": prompt, "max_tokens": n, "stream": True, "ignore_eos": True, "temperature": 0})
    gaps = []
    try:
        for _ in range(2):  # the first warms the route
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp, last, gaps = conn.getresponse(), None, []
            for line in resp:
                if line.startswith(b"data: {"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append((now - last) * 1e3)
                    last = now
            conn.close()
    finally:
        code = srv.stop()
    # the mean gap too: events a read apart bunch (gaps of ~0) when the engine outruns the event loop, which
    # moves the median but not the mean (bench/http_overhead.py saw it on a CPU with a tiny model)
    return {"itl_p50_ms": round(statistics.median(gaps), 3), "itl_mean_ms": round(statistics.fmean(gaps), 3),
            "chunks": len(gaps) + 1, "ready_s": round(srv.ready_s, 2), "sigterm_exit": code}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--greedy-tokens", type=int, default=32, help="tokens a prompt compared with the CPU fp32 path")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda; cpu: a smoke run of the script itself (torch model)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    a = ap.parse_args()
    import torch

    from millis.gen import EngineConfig, SamplingParams, chat_prompt, open_engine
    from millis.gen.engine import run_all
    from gpu_probes import cuda_or_smoke, gpu_slug

    cuda = cuda_or_smoke(a.device)
    if cuda is None:
        return 2
    if not cuda:
        os.environ["MILLIS_NO_KERNELS"] = "1"
    res: dict = {"bench": "gpu_decode", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
                 "torch": torch.__version__,
                 "model": Path(a.gguf).name, "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_decode_{gpu_slug(res['device'])}.json"

    def save(section: str, *keys: str) -> None:
        """Print a section's figures and write every result so far: a time box that ends the run (or a later
        section that raises) keeps what came before it, in the file and in the log."""
        print(f"{section}:", json.dumps({k: res[k] for k in keys if k in res}), flush=True)
        path.write_text(json.dumps(res, indent=1) + "\n")

    t0 = time.perf_counter()
    eng = open_engine(a.gguf, EngineConfig(max_batch=8, max_seq=1024, dtype=a.dtype, device=a.device,
                                           max_prefills_per_step=8))
    if cuda:
        torch.cuda.synchronize()
    res["cold_start_s"] = round(time.perf_counter() - t0, 2)
    res["graphs"] = len(eng.decode.graphs) if cuda else 0
    res["fused_decode"] = bool(cuda and eng.decode.fused)  # Triton kernels, 5 a layer at b1 (MILLIS_NO_FUSED_DECODE=1)
    if cuda:  # their launches overlapped by programmatic dependent launch (MILLIS_NO_PDL=1; off where it failed)
        from millis.gpu import decode_gemv
        from millis.gpu import decode_kernels as dk

        from millis.gpu import decode_layer

        res["pdl"] = res["fused_decode"] and dk.pdl(eng.model.tok_emb.weight)
        res["pdl_off_because"] = dk.PDL["off"]
        # one kernel a layer at b1, its phases behind grid barriers (MILLIS_NO_DECODE_LAYER=1; off where it failed)
        res["per_layer"] = bool(res["fused_decode"] and eng.decode.per_layer)
        res["per_layer_tuned"] = {str(k): v for k, v in decode_layer.TUNED.items()}
        res["layer_us"] = eng.decode.layer_us  # all layers in one kernel each and in five: the engine keeps the faster
        res["layer_agreement"] = getattr(eng.decode, "layer_agreement", {})  # why per_layer may be off: its logits
        ptx = decode_gemv.compiled_ptx() + decode_layer.compiled_ptx()  # compiled in, or PDL changes nothing
        res["pdl_ptx"] = {"kernels": len(ptx), "wait": sum("griddepcontrol.wait" in p for p in ptx),
                          "launch_dependents": sum("griddepcontrol.launch_dependents" in p for p in ptx)}
    save("engine", "cold_start_s", "graphs", "fused_decode", "pdl", "pdl_off_because", "per_layer", "layer_us",
         "layer_agreement", "pdl_ptx")
    prompt = eng.tok.encode("Once upon a time there was a little robot who lived in a quiet town by the sea")[:16]
    figures = decode_figures(eng, prompt, a.new_tokens)
    res.update(figures)
    res["targets"] = {"b1_ms_per_token <= 0.30": res["b1_ms_per_token"] <= 0.30}
    save("decode figures", *figures)
    res["kernels_per_decode_step"] = None
    if cuda:
        res["decode_step_profile"] = safe_step_profile(eng)
        res["kernels_per_decode_step"] = res["decode_step_profile"].get("kernels")
        save("b1 decode step's kernels", "decode_step_profile")
    if cuda and res["per_layer"]:  # b1 in one kernel a layer against five, alternated
        ab = safe_alternated(a, prompt, "MILLIS_NO_DECODE_LAYER", ("per_layer", "five_kernels"))
        res["per_layer_ab"] = {**ab, **layer_ab_validity(ab)}
        save("b1 one kernel a layer / five, alternated", "per_layer_ab")
    greedy = SamplingParams(max_tokens=a.greedy_tokens)
    gpu_tokens = run_all(eng, [chat_prompt(eng, c) for c in CHATS], greedy)
    os.environ["MILLIS_NO_KERNELS"] = "1"  # the CPU reference: the torch model in fp32 on the same weights
    ref_eng = open_engine(a.gguf, EngineConfig(max_batch=3, max_seq=512, dtype="fp32", device="cpu"))
    if cuda:
        del os.environ["MILLIS_NO_KERNELS"]
    ref = run_all(ref_eng, [chat_prompt(ref_eng, c) for c in CHATS], greedy)
    agree = [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), min(len(g), len(r)))
             for g, r in zip(gpu_tokens, ref)]
    res["greedy_agreement"] = {"leading_equal": agree, "of": [len(r) for r in ref],
                               "gpu_text": [eng.tok.decode(g) for g in gpu_tokens]}
    res["targets"][f"greedy tokens equal on 3 prompts ({a.greedy_tokens}, or to EOS)"] = all(
        len(g) == len(r) == n for g, r, n in zip(gpu_tokens, ref, agree))
    save("greedy tokens against the CPU fp32 path", "greedy_agreement", "targets")
    if not a.no_http:
        try:
            res["http"] = http_itl(a.gguf, "Once upon a time", a.new_tokens, a.device, a.dtype)
            res["http"]["overhead_ms"] = round(res["http"]["itl_p50_ms"] - res["b1_ms_per_token"], 3)
        except Exception as e:  # noqa: BLE001 -- reported, the rest of the results stand
            res["http"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        save("HTTP inter-token latency", "http")
    print(json.dumps(res, indent=1), flush=True)
    if cuda:  # the same check with the GPU engine in fp32: bf16's rounding alone can flip a near-tie
        del eng
        torch.cuda.empty_cache()
        eng = open_engine(a.gguf, EngineConfig(max_batch=3, max_seq=512, dtype="fp32", device=a.device))
        g32 = run_all(eng, [chat_prompt(eng, c) for c in CHATS], greedy)
        agree32 = [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), min(len(g), len(r)))
                   for g, r in zip(g32, ref)]
        res["greedy_agreement_fp32"] = {"leading_equal": agree32, "of": [len(r) for r in ref],
                                        "fused_decode": bool(eng.decode.fused)}
        res["targets"]["greedy tokens equal on 3 prompts, GPU fp32"] = all(
            len(g) == len(r) == n for g, r, n in zip(g32, ref, agree32))
        save("GPU fp32 against CPU fp32", "greedy_agreement_fp32", "targets")
    if cuda and res["fused_decode"]:  # last (a time box cuts it first): b1 without the batch-1 gemv kernels
        os.environ["MILLIS_NO_DECODE_GEMV"] = "1"
        del eng, ref_eng
        torch.cuda.empty_cache()
        eng = open_engine(a.gguf, EngineConfig(max_batch=1, max_seq=1024, dtype=a.dtype, device=a.device))
        b1 = decode_figures(eng, prompt, a.new_tokens)
        res["without_decode_gemv"] = {"b1_ms_per_token": b1["b1_ms_per_token"],
                                      "kernels_per_decode_step": kernels_per_step(eng)}
        save("without the batch-1 gemv kernels (MILLIS_NO_DECODE_GEMV=1)", "without_decode_gemv")
    if cuda and res.get("pdl"):  # b1 with and without programmatic dependent launch, alternated
        os.environ.pop("MILLIS_NO_DECODE_GEMV", None)
        del eng
        torch.cuda.empty_cache()
        res["pdl_ab"] = safe_alternated(a, prompt, "MILLIS_NO_PDL", ("pdl", "no_pdl"))
        if "error" not in res["pdl_ab"]:  # each engine chose one kernel a layer or five itself: the same, or PDL's
            res["pdl_ab"]["same_layer_kernels"] = (  # figure also holds that choice's
                res["pdl_ab"]["pdl"]["per_layer"] == res["pdl_ab"]["no_pdl"]["per_layer"])
        save("b1 with / without PDL, alternated", "pdl_ab")
    return 0


if __name__ == "__main__":
    sys.exit(main())

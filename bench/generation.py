"""Generation benchmark: millis.gen against HF `generate` and CTranslate2, in one run, systems alternated.

    bash bench/peers/setup.sh ct2                      # once: CTranslate2's venv
    .venv/bin/python bench/generation.py               # CPU: GPT-2 124M (random weights), 2 threads
    python bench/generation.py --device cuda           # GPU: a Llama-3.2-1B-shaped model, bf16

Every system runs in its own process (bench/peers/gen_runner.py; CTranslate2 in its own venv) with the
same thread count, and decodes greedily exactly N new tokens per row (EOS ignored) from the same
equal-length prompts of random ids. Round r times every cell for every system, the systems in a seeded
random order drawn for that round; figures are medians over rounds x repeats.

- ms_per_token: one decode step (every row gets one token), prefill excluded:
  (T(prompt 16, N new) - T(prompt 16, 1 new)) / (N - 1), T the median wall time of one whole call;
- tokens_per_s: batch * 1000 / ms_per_token (decode throughput);
- ttft_ms (batch-1 rows): time to the first token of a 128-token prompt (ttft_512_ms: 512 tokens);
- gbps: the matmul weights (head included, embeddings not) read per step / ms_per_token: a batch-1
  decode step reads each of them once, so this is the achieved share of memory bandwidth;
- pct_bw: gbps as a share of the machine's read bandwidth, measured in the same run (bench/peers/bandwidth.py);
- x_ct2: millis's step time / CTranslate2's at the same precision (fp32 - float32, int8 - int8), the median
  of per-round ratios [min-max] (each round's step from that round's calls, rounds paired by number; a round
  where a call failed, or a system decoded other than the asked token count, is left out and listed in the
  row's `errors`): below 1 is faster;
- agree: leading greedy tokens equal to HF fp32's (batch 1, N tokens): fp32 systems should agree fully.
Systems: millis:fp32 and millis:int8 run millis's native C step (millis.gen.load.runs_native); millis:fp32-torch
and millis:int8-torch the torch model. Writes bench/results/generation_<device>.json (`rows`) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
from checkouts import write_result  # noqa: E402
from bandwidth import measure_bandwidth  # noqa: E402
import models  # noqa: E402

RUNNER = str(HERE / "peers" / "gen_runner.py")
VENV = {"millis": None, "hf": None, "ct2": "ct2"}  # system -> venv under bench/.venvs (None: this one)
DEFAULT_SYSTEMS = {"cpu": "millis:fp32,millis:int8,hf:fp32,ct2:int8,ct2:float32,millis:fp32-torch",
                   "cuda": "millis:bf16,hf:bf16,hf:static-compile"}
MODEL = {"cpu": "gpt2", "cuda": "llama-1b"}
BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "float16": 2, "static-compile": 2,
         "int8": 1, "int8-torch": 1, "fp32-torch": 4, "int8_float32": 1, "int8_bfloat16": 1, "int8_float16": 1}
PROMPT = 16  # prompt length of the decode cells


def matmul_params(model_dir: str) -> int:
    """Weights of every matmul of one decode step: the blocks' projections and the output head."""
    c = json.loads(Path(model_dir, "config.json").read_text())
    if c["model_type"] == "gpt2":
        d = c["n_embd"]
        return c["n_layer"] * 12 * d * d + c["vocab_size"] * d
    d, ff, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    return c["num_hidden_layers"] * (d * (d + 2 * kv) + d * d + 3 * d * ff) + c["vocab_size"] * d


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab - 1, size=(batch, length)).tolist()


CT2_SAME = {"fp32": "float32", "fp32-torch": "float32", "int8": "int8", "int8-torch": "int8"}


def round_steps(ms: dict, dk, fk) -> tuple[list[int], list[float]]:
    """One decode-step time per round: (median decode call - median 1-token call) / (N - 1) of that round.
    ms[key]: {round: [that round's calls]}; a round where either cell failed is left out (never paired with
    another round's calls) -> (the rounds, their step times)."""
    n = dk[1][3]
    d, f = ms[dk], ms[fk]
    rounds = sorted(set(d) & set(f))
    return rounds, [round((statistics.median(d[r]) - statistics.median(f[r])) / (n - 1), 3) for r in rounds]


def wrong_count(tokens, batch: int, n: int) -> str | None:
    """Why a reply's tokens are not `batch` rows of `n` new tokens each (None: they are)."""
    if not isinstance(tokens, list) or len(tokens) != batch:
        return f"{len(tokens) if isinstance(tokens, list) else tokens!r} rows, not {batch}"
    bad = [len(t) for t in tokens if len(t) != n]
    return f"rows of {sorted(set(bad))} tokens, not {n}" if bad else None


def gen(peer, ps, n, reps, warmup):
    r = peer.request({"cmd": "gen", "prompts": ps, "new_tokens": n, "n": reps, "warmup": warmup})
    return r["ms"], r["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when torch sees one)")
    ap.add_argument("--systems", default="", help="system:precision,... (default: per device)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64, help="N at batch 1")
    ap.add_argument("--new-tokens-batched", type=int, default=32, help="N at batch > 1")
    ap.add_argument("--ttft-prompts", default="128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="timed calls per cell, system and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.3,
                    help="seconds idle before each system's turn: the previous one's spinning threads go quiet")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="read-bandwidth probe size (0: skip)")
    ap.add_argument("--out", default="", help="results JSON (default bench/results/generation_<device>.json)")
    a = ap.parse_args()
    device = a.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = models.decoder_dir(MODEL[device])
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    vocab = cfg["vocab_size"]
    batches = [int(b) for b in a.batches.split(",")]
    ttfts = [int(x) for x in a.ttft_prompts.split(",") if x]
    newtok = {b: a.new_tokens if b == 1 else a.new_tokens_batched for b in batches}
    max_seq = max([PROMPT + max(newtok.values())] + ttfts) + 8
    work = str(HERE / ".cache" / "gen" / MODEL[device])

    peers = []
    for spec in (a.systems or DEFAULT_SYSTEMS[device]).split(","):
        sysname, prec = spec.split(":")
        p = harness.Peer(sysname, model_dir, work_dir=work, threads=a.threads, name=spec, runner=RUNNER,
                         venv=VENV[sysname], args=["--precision", prec, "--device", device,
                                                   "--max-batch", str(max(batches)), "--max-seq", str(max_seq)])
        print(f"{spec}: {'ready in %.1f s' % p.prep_s if p.alive else 'SKIPPED: ' + str(p.error)}", flush=True)
        if p.alive:
            peers.append(p)

    # cells: (name, batch, prompt length, new tokens)
    cells = []
    for b in batches:
        cells += [("decode", b, PROMPT, newtok[b]), ("first", b, PROMPT, 1)]
    cells += [("ttft", 1, L, 1) for L in ttfts]
    inputs = {c: prompts(c[1], c[2], vocab, seed=c[1] * 1000 + c[2]) for c in cells}
    ms = {(p.name, c): {} for p in peers for c in cells}  # {round: that round's calls}
    toks, cold, errors = {}, {}, {}
    shuffle = random.Random(0)
    for r in range(a.rounds):
        t0 = time.perf_counter()
        order = list(peers)
        shuffle.shuffle(order)  # a seeded random order each round (a rotation: each system always after the same)
        for c in cells:
            for p in order:
                if not p.alive:
                    continue
                time.sleep(a.pause)
                try:
                    t1 = time.perf_counter()
                    got, tk = gen(p, inputs[c], c[3], a.reps, warmup=1 if r == 0 else 0)
                    if r == 0 and c == cells[0]:
                        cold[p.name] = 1e3 * (time.perf_counter() - t1) - sum(got)  # the warm-up call
                except harness.PeerError as e:
                    print(f"  {e}", file=sys.stderr)
                    errors.setdefault(p.name, []).append(f"round {r} {'/'.join(map(str, c))}: {e}")
                    continue
                if why := wrong_count(tk, c[1], c[3]):  # every system must decode exactly the asked tokens
                    print(f"  {p.name} {'/'.join(map(str, c))}: {why}", file=sys.stderr)
                    errors.setdefault(p.name, []).append(f"round {r} {'/'.join(map(str, c))}: {why}")
                    continue
                ms[(p.name, c)][r] = got
                if c[0] == "decode" and c[1] == 1:
                    toks[p.name] = tk[0]
        print(f"round {r + 1}/{a.rounds}: {time.perf_counter() - t0:.0f} s", flush=True)
        partial = (Path(a.out) if a.out else HERE / "results" / f"generation_{device}.json").with_suffix(".partial.json")
        write_result(partial, {"rounds_done": r + 1, "errors": errors, "samples_ms": {  # a cut run keeps its rounds
            f"{k[0]}|{'/'.join(map(str, k[1]))}": {str(i): [round(x, 3) for x in v] for i, v in rounds.items()}
            for k, rounds in ms.items()}}, indent=1)
    infos = {}
    for p in peers:
        try:
            infos[p.name] = p.info()
        except harness.PeerError:
            pass
        p.close()

    flat = {k: [x for r in sorted(v) for x in v[r]] for k, v in ms.items()}
    med = {k: statistics.median(v) for k, v in flat.items() if v}
    bw = measure_bandwidth(a.bandwidth_mib, a.threads, Path(work)) if a.bandwidth_mib else {}
    wparams = matmul_params(model_dir)
    ref = toks.get("hf:fp32")
    rows = []
    for p in peers:
        sysname, prec = p.name.split(":")
        for b in batches:
            dk, fk = (p.name, ("decode", b, PROMPT, newtok[b])), (p.name, ("first", b, PROMPT, 1))
            if dk not in med or fk not in med:
                continue
            step = (med[dk] - med[fk]) / (newtok[b] - 1)
            rounds, steps = round_steps(ms, dk, fk)
            row = {"system": sysname, "model": MODEL[device], "precision": prec, "batch": b,
                   "ms_per_token": round(step, 2), "ttft_ms": None, "tokens_per_s": round(b * 1e3 / step, 1),
                   "gbps": round(wparams * BYTES.get(prec, 4) / step / 1e6, 2),
                   "e2e_ms": round(med[dk], 1), "new_tokens": newtok[b], "round_ms": steps, "round_ids": rounds}
            if p.name in errors:
                row["errors"] = errors[p.name]
            if bw:
                row["pct_bw"] = round(100 * row["gbps"] / bw["gbps"], 1)
            if b == 1:
                for L in ttfts:
                    key = (p.name, ("ttft", 1, L, 1))
                    if key in med:
                        row["ttft_ms" if L == 128 else f"ttft_{L}_ms"] = round(med[key], 1)
                if ref and p.name in toks:
                    same = next((i for i, (x, y) in enumerate(zip(toks[p.name], ref)) if x != y), len(ref))
                    row["agree"] = f"{same}/{len(ref)}"
                row["cold_first_call_ms"] = round(cold[p.name], 1) if p.name in cold else None
                if p.name not in cold:
                    row["cold_first_call_error"] = "the first call failed: no cold start measured"
            rows.append(row)
    for r in rows:  # millis against CTranslate2 at the same precision, round by round
        peer = next((c for c in rows if c["system"] == "ct2" and c["batch"] == r["batch"] and
                     c["precision"] == CT2_SAME.get(r["precision"])), None)
        if r["system"] == "millis" and peer:  # paired by round, not by position
            theirs = dict(zip(peer["round_ids"], peer["round_ms"]))
            ratios = [x / theirs[i] for i, x in zip(r["round_ids"], r["round_ms"]) if theirs.get(i)]
            if ratios:
                r["x_ct2"] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                              "max": round(max(ratios), 3), "rounds": [round(x, 3) for x in ratios]}
    for b in batches:  # tokens/s against CTranslate2 int8 in the same run
        ct2 = next((r for r in rows if r["system"] == "ct2" and r["precision"] == "int8" and r["batch"] == b), None)
        for r in rows:
            if ct2 and r["batch"] == b:
                r["vs_ct2_int8"] = round(r["tokens_per_s"] / ct2["tokens_per_s"], 2)

    print(f"\n{MODEL[device]} ({model_dir}), {device}, {a.threads} threads, {a.rounds} rounds x {a.reps} calls; "
          f"decode after a {PROMPT}-token prompt")
    hdr = f"{'system':<22} {'batch':>5} {'ms/token':>9} {'tokens/s':>9} {'x ct2 int8':>10} {'TTFT 128':>9} " \
          f"{'TTFT 512':>9} {'GB/s':>6} {'% bw':>5} {'agree':>6}  x ct2 same precision [min-max]"
    print(hdr)
    for r in rows:
        print(f"{r['system'] + ':' + r['precision']:<22} {r['batch']:>5} {r['ms_per_token']:>9.2f} "
              f"{r['tokens_per_s']:>9.1f} {r.get('vs_ct2_int8', float('nan')):>10.2f} "
              f"{r['ttft_ms'] or float('nan'):>9.1f} {r.get('ttft_512_ms', float('nan')):>9.1f} "
              f"{r['gbps']:>6.2f} {r.get('pct_bw', float('nan')):>5.0f} {r.get('agree', ''):>6}  "
              + (f"{x['median']:.2f} [{x['min']:.2f}-{x['max']:.2f}]" if (x := r.get("x_ct2")) else ""))
    if bw:
        print(f"machine read bandwidth: {bw['gbps']} GB/s ({bw})")
    from millis.common.hardware import describe

    out = {"date": time.strftime("%Y-%m-%d"), "device": device, "machine": describe(), "bandwidth": bw,
           "command": " ".join(sys.argv), "threads": a.threads, "rounds": a.rounds, "reps": a.reps, "prompt": PROMPT,
           "model_dir": model_dir,
           "matmul_params": wparams, "systems": infos, "cold_first_call_ms": cold, "rows": rows, "errors": errors,
           "samples_ms": {f"{k[0]}|{'/'.join(map(str, k[1]))}": [round(x, 2) for x in v] for k, v in flat.items()},
           "sample_rounds": {f"{k[0]}|{'/'.join(map(str, k[1]))}": sorted(v) for k, v in ms.items()}}
    if device == "cuda":
        import torch
        out["gpu"] = torch.cuda.get_device_name()
    path = Path(a.out) if a.out else HERE / "results" / f"generation_{device}.json"
    write_result(path, out, indent=2)
    path.with_suffix(".partial.json").unlink(missing_ok=True)  # the whole result is written


if __name__ == "__main__":
    main()

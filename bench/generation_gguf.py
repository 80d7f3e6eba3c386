"""millis's native GGUF decoder against llama.cpp on the same GGUF files, same machine, same threads.

    bash bench/peers/setup.sh llamacpp                  # once: llama-cpp-python's venv
    .venv/bin/python bench/generation_gguf.py           # everything (files built once into bench/.cache/gguf)
    .venv/bin/python bench/generation_gguf.py --only ppl,greedy --files smollm2-f32,smollm2-q8_0
    .venv/bin/python bench/generation_gguf.py --quick   # smoke run: tiny settings, a tiny random Llama

Files (bench/gguf_files.py): SmolLM2-135M-Instruct as shipped (Q4_1), dequantized (F32), and re-quantized
by llama.cpp (Q8_0, Q4_K_M); a Llama-3.2-1B-shaped model of random weights (Q4_0, Q8_0, Q4_K_M).
On smollm2-q8_0, `millis-int8` is millis's own int8 (EngineConfig quant="int8": the F32 file's matrices
requantized to Q8_0 at load) beside millis and llama.cpp on llama.cpp's Q8_0 file.
Each system runs in its own process (bench/peers/gguf_runner.py; llama.cpp in bench/.venvs/llamacpp),
both through the same flat-batch forward call. Per file, round r runs every cell for every system, the
systems in a seeded random order drawn for that round, a pause before each turn. Per round and system:
- decode_ms: median of 64 greedy batch-1 steps after a 16-token prompt (one step = one forward call);
- prefill_<n>_ms: median of --prefill-reps fresh prompts of n tokens (logits of the last one);
- batch8_ms: median of 32 steps of 8 sequences, one token each (both systems batch 8 sequences);
- ratio (millis / llama.cpp, time: < 1 is millis faster): the median of per-round ratios, [min, max];
- gbps: weight bytes one decode step reads (bench/gguf_files.decode_bytes; tied head counted) / decode_ms,
  and its share of the machine's read bandwidth (--only bandwidth: a 1 GiB reduction, best of 5); with
  decode, each round also reads the bandwidth before its cells (bandwidth_rounds), and decode_pct_bw_round
  is the median over rounds of the decode's GB/s over that round's probe;
- ppl: perplexity of the last 10% of tinyshakespeare, first --ppl-tokens tokens (millis's tokenizer, the
  same ids and windows for every system), context 512 / stride 256; top-1 agreement with F32 per position;
- greedy: 32 greedy tokens of 3 chat prompts (the GGUF's chat template); leading tokens equal to millis F32;
- contention: decode_ms while one other CPU-bound process runs, as a ratio to the quiet figure;
- serve: `millis serve builtin:smollm2` at its defaults, 3 chat completions, VmRSS / VmHWM.
Writes bench/results/generation_gguf.json, merged with what is there (a rerun of one section or file
replaces only that; each file's entry and each cell records the date, threads and CPU it was measured with, in
`cell_runs`), and prints the tables from the merged results. It refuses to merge into a file measured on
another machine (CPU, cores, ISA) or thread count: --fresh, or another --out.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from bandwidth import RoundProbe, measure_bandwidth  # noqa: E402
import gguf_files  # noqa: E402
import gguf_report  # noqa: E402
import harness  # noqa: E402

RUNNER = str(HERE / "peers" / "gguf_runner.py")
WORK = gguf_files.CACHE / "runs"
SECTIONS = ("bandwidth", "decode", "prefill", "batch", "ppl", "greedy", "contention", "serve")
FILES = "smollm2-q4_1,smollm2-f32,smollm2-q8_0,smollm2-q4_k_m,llama1b-q4_0,llama1b-q8_0,llama1b-q4_k_m"
CHAT = ("What is the capital of France?", "Write a haiku about the sea.",
        "Explain what a CPU cache is in one sentence.")
# full settings, then --quick's (a flag given explicitly wins over both)
PRESETS = {"full": dict(rounds=5, decode_steps=64, prefill="128,512", prefill_reps=2, batch_steps=32,
                        ppl_tokens=4096, context=512, stride=256, greedy_tokens=32, contention_rounds=3,
                        bandwidth_mib=1024, files=FILES, contention_files="smollm2-q4_1,llama1b-q4_0"),
           "quick": dict(rounds=2, decode_steps=8, prefill="32,64", prefill_reps=1, batch_steps=4,
                         ppl_tokens=300, context=128, stride=64, greedy_tokens=8, contention_rounds=1,
                         bandwidth_mib=128, files="smollm2-q4_1,smollm2-q8_0,llamatiny-q4_0",
                         contention_files="llamatiny-q4_0")}
PROMPT = 16  # prompt tokens before decode / batch steps


def build_files(names: list[str], threads: int) -> dict[str, str]:
    """{name: path}; smollm2-* and llama1b-* / llamatiny-* (random weights) built on first use."""
    out, smol = {}, [n.split("-", 1)[1] for n in names if n.startswith("smollm2-")]
    if "q8_0" in smol:
        smol.append("f32")  # millis-int8 runs on the F32 file
    if smol:
        out.update(gguf_files.smollm2_files(threads=threads, want=tuple(smol)))
    for tag, shape in (("llama1b", gguf_files.LLAMA_1B), ("llamatiny", gguf_files.LLAMA_TINY)):
        qs = [n.split("-", 1)[1] for n in names if n.startswith(tag + "-")]
        if qs:
            out.update(gguf_files.llama_files(shape, tag, threads=threads, want=tuple(qs)))
    unknown = [n for n in names if n not in out]
    if unknown:
        raise SystemExit(f"unknown files {unknown}; known: smollm2-{{q4_1,f32,q8_0,q4_k_m}}, "
                         f"llama1b-{{q4_0,q8_0,q4_k_m,f32}}, llamatiny-{{...}}")
    return out



def start_peers(a, name: str, files: dict[str, str]) -> tuple[list, dict]:
    specs = [("millis", "millis", files[name], "none"), ("llamacpp", "llamacpp", files[name], "none")]
    if name == "smollm2-q8_0" and "smollm2-f32" in files:
        specs.insert(1, ("millis-int8", "millis", files["smollm2-f32"], "int8"))
    peers, skipped = [], {}
    for label, system, path, quant in specs:
        p = harness.Peer(system, path, work_dir=str(WORK), threads=a.threads, name=f"{label}@{name}", runner=RUNNER,
                         venv=None if system == "millis" else "llamacpp", start_timeout=900,
                         args=["--quant", quant, "--max-seq", "1024", "--max-batch", "8", "--context",
                               str(a.context), "--stride", str(a.stride), "--flash-attn", a.flash_attn])
        p.label = label
        print(f"  {label}: " + (f"ready in {p.prep_s:.1f} s" if p.alive else f"SKIPPED: {p.error}"), flush=True)
        (peers.append(p) if p.alive else skipped.__setitem__(label, p.error))
    return peers, skipped


def proc_memory(pid: int) -> dict:
    """VmRSS / VmHWM of a process, GiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k.lower() + "_gib": round(int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) / 2**20, 3)
            for k in ("VmRSS", "VmHWM")}


def alternate(peers, cells, rounds: int, pause: float, log: str, probe=None, probed=None) -> list[dict]:
    """rounds x cells x peers (a seeded random order per round): [{label: {cell: reply}}] per round. With a probe
    (bandwidth.RoundProbe), each round reads the bandwidth first (appended to `probed`)."""
    out, shuffle = [], random.Random(0)
    for r in range(rounds):
        t0, got = time.perf_counter(), {p.label: {} for p in peers}
        order = list(peers)
        shuffle.shuffle(order)  # a seeded random order each round (a rotation: each system always after the same)
        if probe is not None:
            time.sleep(pause)
            probed.append(probe.read())
        for cell, req in cells:
            for p in order:
                if not p.alive:
                    continue
                time.sleep(pause)  # the previous system's spinning threads go quiet
                if (reply := ask(p, req)) is not None:
                    got[p.label][cell] = reply
        out.append(got)
        print(f"  {log} round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def ask(p, req: dict, timeout: float = 1800) -> dict | None:
    """A peer's reply, or None (printed) when it failed: one system's error does not end the run."""
    try:
        return p.request(req, timeout=timeout)
    except harness.PeerError as e:
        print(f"    {e}", file=sys.stderr)
        return None


def per_round(replies: list[dict], cells) -> dict[str, list[dict]]:
    """{cell: [{system: that round's figure (the median of its samples, ms)} per round]}."""
    return {c: [{lab: round(statistics.median(cs[c]["ms"]), 3) for lab, cs in rnd.items() if c in cs}
                for rnd in replies] for c, _ in cells}


def run_file(a, name: str, files: dict[str, str], ppl_ids: list[int], chat_ids: list[list[int]]) -> dict:
    print(f"\n== {name}", flush=True)
    peers, skipped = start_peers(a, name, files)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "skipped": skipped, "systems": [p.label for p in peers]}
    if not peers:
        return res
    try:
        for p in peers:
            ask(p, {"cmd": "warm"})
        res["info"] = {p.label: r for p in peers if (r := ask(p, {"cmd": "info"}, 60))}
        if not res["info"]:
            return res
        vocab = min(i["vocab"] for i in res["info"].values())
        rng = np.random.default_rng(0)
        ids = lambda n: rng.integers(100, vocab - 100, n).tolist()  # noqa: E731
        cells = []
        if "decode" in a.only:
            cells.append(("decode", {"cmd": "decode", "prompt": ids(PROMPT), "steps": a.decode_steps}))
        if "prefill" in a.only:
            cells += [(f"prefill_{n}", {"cmd": "prefill", "ids": ids(n), "n": a.prefill_reps}) for n in a.prefill]
        if "batch" in a.only:
            cells.append(("batch8", {"cmd": "batch", "prompts": [ids(PROMPT) for _ in range(8)],
                                     "steps": a.batch_steps}))
        if cells:
            probe, probed = None, []
            if "decode" in a.only:  # new decode rounds: the old rounds' probes no longer pair with them
                res["bandwidth_rounds"] = probed if "bandwidth" in a.only else None
                probe = RoundProbe(a.bandwidth_mib, a.threads, WORK) if "bandwidth" in a.only else None
            replies = alternate(peers, cells, a.rounds, a.pause, "timing", probe, probed)
            del probe  # its buffer
            res["cells"] = per_round(replies, cells)
            res["decode_tokens"] = {lab: cs["decode"]["tokens"] for lab, cs in replies[-1].items() if "decode" in cs}
            res["memory"] = {p.label: proc_memory(p.proc.pid) for p in peers if p.alive}
        if "contention" in a.only and name in a.contention_files:
            dec = [("decode", {"cmd": "decode", "prompt": ids(PROMPT), "steps": a.decode_steps})]
            quiet = per_round(alternate(peers, dec, a.contention_rounds, a.pause, "quiet"), dec)["decode"]
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                busy = per_round(alternate(peers, dec, a.contention_rounds, a.pause, "contended"), dec)["decode"]
            finally:
                burner.kill()
                burner.wait()
            res["contention"] = {"quiet": quiet, "busy": busy}
        if "ppl" in a.only and ppl_ids:
            from millis.gen.perplexity import windows
            wins = windows(len(ppl_ids), a.context, a.stride)
            res["ppl"] = {}
            positions = sum(e - b for b, e, _ in wins)  # every window's context counted, as millis eval does
            for p in peers:
                r = ask(p, {"cmd": "ppl", "ids": ppl_ids, "windows": wins}, 3600)
                if r is None:
                    continue
                res["ppl"][p.label] = {**{k: r[k] for k in ("perplexity", "nll", "tokens", "argmax", "s")},
                                       "positions_per_s": round(positions / r["s"], 1)}
                print(f"  ppl {p.label}: {r['perplexity']:.3f} ({r['s']:.0f} s)", flush=True)
        if "greedy" in a.only and chat_ids:
            res["greedy"] = {p.label: r["tokens"] for p in peers
                             if (r := ask(p, {"cmd": "greedy", "prompts": chat_ids, "n": a.greedy_tokens}))}
    finally:
        for p in peers:
            p.close()
    return res


def text_ids(a, path: str) -> list[int]:
    """The last 10% of tinyshakespeare, tokenized once with millis's tokenizer: its first --ppl-tokens ids."""
    from millis.gen.gguf import read_gguf

    text = Path(harness.data_root(), "tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    return read_gguf(path).tokenizer.encode(text[len(text) * 9 // 10:])[:a.ppl_tokens]


def chat_prompt_ids(path: str) -> list[list[int]]:
    """CHAT through the file's chat template (what millis.gen.chat_prompt does for an engine)."""
    from millis.gen.chat_template import encode_rendered, render_chat
    from millis.gen.gguf import read_gguf

    g = read_gguf(path)
    return [encode_rendered(g.tokenizer, render_chat(g.chat_template, [{"role": "user", "content": t}],
                                                     g.special_tokens)) for t in CHAT]


def serve_memory(n: int = 3) -> dict:
    """`millis serve builtin:smollm2` at its defaults: ready time, n chat completions, VmRSS / VmHWM."""
    from millis.loadgen.process import ServerProcess, serve_command

    s = ServerProcess(serve_command("builtin:smollm2"), log=WORK / "serve.log")
    try:
        out = {"command": "millis serve builtin:smollm2 (defaults)", "ready_s": round(s.ready_s, 2),
               "idle": proc_memory(s.pid), "requests": []}
        for text in CHAT[:n]:
            t0 = time.perf_counter()
            code, _, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                                             "max_tokens": 32})
            out["requests"].append({"status": code, "ms": round((time.perf_counter() - t0) * 1e3, 1),
                                    "usage": (body or {}).get("usage")})
        out.update(proc_memory(s.pid))
    finally:
        out["exit"] = s.stop()
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections: " + ",".join(SECTIONS))
    ap.add_argument("--files", help=f"GGUF files (default {FILES})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--decode-steps", type=int)
    ap.add_argument("--prefill", help="prompt lengths, comma-separated (default 128,512)")
    ap.add_argument("--prefill-reps", type=int, help="fresh prompts per length, system and round")
    ap.add_argument("--batch-steps", type=int)
    ap.add_argument("--ppl-tokens", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--stride", type=int)
    ap.add_argument("--greedy-tokens", type=int)
    ap.add_argument("--contention-rounds", type=int)
    ap.add_argument("--contention-files", help="files measured under contention")
    ap.add_argument("--bandwidth-mib", type=int)
    ap.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"), help="llama.cpp (default: its own)")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds idle before each system's turn")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny settings and files")
    ap.add_argument("--fresh", action="store_true", help="do not merge with the existing results file")
    ap.add_argument("--out", default=str(HERE / "results" / "generation_gguf.json"))
    a = ap.parse_args()
    for k, v in PRESETS["quick" if a.quick else "full"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.only = [s for s in a.only.split(",") if s]
    if set(a.only) - set(SECTIONS):
        raise SystemExit(f"unknown sections {sorted(set(a.only) - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    a.files = [f for f in a.files.split(",") if f]
    a.prefill = [int(n) for n in a.prefill.split(",") if n]
    a.contention_files = [f for f in a.contention_files.split(",") if f]
    from gguf_runner import CHUNK

    if "ppl" in a.only and a.context > CHUNK:  # llama.cpp's batch holds CHUNK tokens a call
        raise SystemExit(f"--context {a.context}: at most {CHUNK} (a perplexity window is one forward call of "
                         f"llama.cpp's {CHUNK}-token batch)")
    return a


SAME_MACHINE = ("cpu", "cpu_id", "cores", "isa", "machine")


def merge_mismatch(old: dict, machine: dict, threads: int) -> str | None:
    """Why results in `old` may not be merged with a run on `machine` at `threads` (None: they may): cells
    from another CPU or thread count would be read under this run's label."""
    was = old.get("machine") or {}
    diff = [f"{k} {was.get(k)!r} (here {machine.get(k)!r})" for k in SAME_MACHINE if was.get(k) != machine.get(k)]
    if old.get("threads") != threads:
        diff.append(f"threads {old.get('threads')!r} (here {threads})")
    return ", ".join(diff) or None


def main() -> None:
    from millis.common.hardware import describe

    from checkouts import write_result

    a = parse_args()
    path = Path(a.out)
    old = json.loads(path.read_text()) if path.is_file() and not a.fresh else {}
    machine = describe()
    if old and (why := merge_mismatch(old, machine, a.threads)):
        raise SystemExit(f"{path} was measured with {why}: its cells would be merged under this machine's label. "
                         f"Run with --fresh, or give another --out")
    out = {**old, "machine": machine, "threads": a.threads}
    stamp = {"threads": a.threads, **{k: machine.get(k) for k in ("cpu", "cpu_id", "cores")}}
    out.setdefault("runs", []).append({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                                       "settings": {k: v for k, v in vars(a).items() if k != "out"}, **stamp})
    out["llama_cpp_build"] = gguf_report.llamacpp_build()
    t_start = time.perf_counter()
    if "bandwidth" in a.only:
        out["bandwidth"] = measure_bandwidth(a.bandwidth_mib, a.threads, WORK)
        print(f"read bandwidth: {out['bandwidth']}", flush=True)
    per_file = [s for s in a.only if s not in ("bandwidth", "serve")]
    if per_file:
        files = build_files(a.files, a.threads)
        out.setdefault("files", {}).update({n: gguf_files.describe_file(n, p) for n, p in files.items()})
        smol = next((files[n] for n in files if n.startswith("smollm2")), None)
        ppl_ids = text_ids(a, smol) if smol and "ppl" in a.only else []
        chat_ids = chat_prompt_ids(smol) if smol and "greedy" in a.only else []
        out["ppl_setup"] = {"tokens": len(ppl_ids), "context": a.context, "stride": a.stride} if ppl_ids else \
            out.get("ppl_setup")
        for name in a.files:
            is_smol = name.startswith("smollm2")
            res = run_file(a, name, files, ppl_ids if is_smol else [], chat_ids if is_smol else [])
            entry = out.setdefault("by_file", {}).setdefault(name, {})
            cells = res.pop("cells", {})
            entry.setdefault("cells", {}).update(cells)  # a rerun of one cell replaces that cell
            entry.setdefault("cell_runs", {}).update({c: {"date": res["date"], **stamp} for c in cells})
            entry.update(res, **stamp)
            write_result(path, out, indent=None, quiet=True)  # progress kept if a later file fails
    if "serve" in a.only:
        out["serve"] = serve_memory()
        print(f"serve: {out['serve']}", flush=True)
    out["runs"][-1]["seconds"] = round(time.perf_counter() - t_start)
    out["rows"] = gguf_report.rows(out)
    out["ppl"] = gguf_report.ppl_rows(out)
    out["greedy"] = gguf_report.greedy_rows(out)
    out["contention"] = gguf_report.contention_rows(out)
    gguf_report.print_tables(out)
    write_result(path, out, quiet=True)
    print(f"wrote {path} ({out['runs'][-1]['seconds']} s)")


if __name__ == "__main__":
    main()

"""Summaries and tables of bench/generation_gguf.py's results (the merged JSON, so a partial rerun reports
everything measured so far). Figures are medians over rounds of per-round medians; a ratio is the median of
per-round ratios millis / llama.cpp of time, with its [min, max] over rounds (< 1: millis faster)."""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF = "llamacpp"  # the peer every ratio divides by
LABEL = {"millis": "millis", "millis-int8": "millis int8", "llamacpp": "llama.cpp"}


def llamacpp_build() -> dict:
    """llama-cpp-python's version and llama_print_system_info() (from its venv), and the build flags
    bench/peers/setup.sh built it with (CMAKE_ARGS, written beside the venv: the native ISA, less AMX on CPUs
    that have it; MILLIS_LLAMACPP_CMAKE_ARGS overrides them at setup)."""
    flags = HERE / ".venvs" / "llamacpp" / ".millis-cmake-args"
    out = {"cmake_args": flags.read_text().strip() if flags.exists() else None,
           "setup": "bench/peers/setup.sh llamacpp"}
    py = HERE / ".venvs" / "llamacpp" / "bin" / "python"
    code = ("import json, llama_cpp as L; print(json.dumps({'version': L.__version__, "
            "'system_info': L.llama_print_system_info().decode()}))")
    try:
        r = subprocess.run([str(py), "-c", code], check=False, capture_output=True, text=True, timeout=120)
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except Exception as e:  # no venv: the report says so
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(rounds: list[dict], label: str) -> dict | None:
    """{median, min, max, rounds} of per-round label / REF (rounds where both ran)."""
    rs = [r[label] / r[REF] for r in rounds if label in r and REF in r and r[REF] > 0]
    if not rs or label == REF:
        return None
    return {"median": round(statistics.median(rs), 3), "min": round(min(rs), 3), "max": round(max(rs), 3),
            "rounds": [round(x, 3) for x in rs]}


def machine(out: dict) -> dict:
    """What every row records of the machine: CPU model, ISA, threads."""
    m = out.get("machine", {})
    return {"cpu": m.get("cpu"), "isa": m.get("isa"), "threads": out.get("threads")}


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_bytes(out: dict, name: str, label: str) -> int | None:
    f = out.get("files", {})
    if label == "millis-int8":  # millis's int8 of the F32 file: its float matrices as Q8_0
        return f.get("smollm2-f32", {}).get("decode_bytes_q8_0")
    return f.get(name, {}).get("decode_bytes")


def rows(out: dict) -> list[dict]:
    """One row per (file, system) with timing: figures, ratios to llama.cpp, GB/s, memory."""
    import gguf_files

    bw = (out.get("bandwidth") or {}).get("gbps")
    res = []
    for name, e in out.get("by_file", {}).items():
        cells = e.get("cells", {})
        if not cells:
            continue
        info = out.get("files", {}).get(name)
        for label in e.get("systems", []):
            r = {"file": name, "system": label, **machine(out),
                 "format": "Q8_0 (millis int8 of smollm2-f32)" if label == "millis-int8" else
                 (gguf_files.type_mix(info) if info else None)}
            for cell, rounds in cells.items():
                v = med([rd.get(label) for rd in rounds])
                if v is None:
                    continue
                r[f"{cell}_ms"] = round(v, 2)
                if ratio(rounds, label):
                    r[f"{cell}_ratio"] = ratio(rounds, label)
            if "decode_ms" in r:
                r["decode_tok_s"] = round(1e3 / r["decode_ms"], 1)
                nb = decode_bytes(out, name, label)
                if nb:
                    r["decode_gbps"] = round(nb / r["decode_ms"] / 1e6, 2)
                    r["decode_pct_bw"] = round(100 * r["decode_gbps"] / bw, 1) if bw else None
                    probed = e.get("bandwidth_rounds") or []
                    shares = [100 * nb / rd[label] / 1e6 / g for rd, g in zip(cells["decode"], probed)
                              if g and rd.get(label)]
                    if shares:  # each round's decode over the probe read just before it
                        r["decode_pct_bw_round"] = round(med(shares), 1)
            if "batch8_ms" in r:
                r["batch8_tok_s"] = round(8e3 / r["batch8_ms"], 1)
            toks = e.get("decode_tokens", {})
            if label != REF and label in toks and REF in toks:
                r["decode_agree"] = f"{leading_equal(toks[label], toks[REF])}/{len(toks[REF])}"
            r.update(e.get("memory", {}).get(label, {}))
            res.append(r)
        for label, why in e.get("skipped", {}).items():
            res.append({"file": name, "system": label, "skipped": str(why)[:300]})
    return res


def ppl_rows(out: dict) -> list[dict]:
    """Perplexity per (file, system), and top-1 agreement with F32 on the same positions: with the same
    system's F32 run (millis int8: millis F32) and with millis F32."""
    ref = out.get("by_file", {}).get("smollm2-f32", {}).get("ppl", {})
    res = []
    for name, e in out.get("by_file", {}).items():
        for label, p in e.get("ppl", {}).items():
            own = ref.get(REF if label == REF else "millis", {}).get("argmax")
            r = {"file": name, "system": label, **machine(out), "perplexity": round(p["perplexity"], 4),
                 "tokens": p["tokens"],
                 "positions_per_s": p.get("positions_per_s")}
            for key, a in (("agree_own_f32", own), ("agree_millis_f32", ref.get("millis", {}).get("argmax"))):
                if a and len(a) == len(p["argmax"]):
                    r[key] = round(sum(x == y for x, y in zip(a, p["argmax"])) / len(a), 4)
            res.append(r)
    return res


def greedy_rows(out: dict) -> list[dict]:
    """Leading greedy tokens equal to millis F32's, per chat prompt."""
    ref = out.get("by_file", {}).get("smollm2-f32", {}).get("greedy", {}).get("millis")
    res = []
    for name, e in out.get("by_file", {}).items():
        for label, toks in e.get("greedy", {}).items():
            r = {"file": name, "system": label, **machine(out), "tokens": len(toks[0]) if toks else 0}
            if ref and len(ref) == len(toks):
                r["equal_to_millis_f32"] = [leading_equal(t, u) for t, u in zip(toks, ref)]
            res.append(r)
    return res


def contention_rows(out: dict) -> list[dict]:
    res = []
    for name, e in out.get("by_file", {}).items():
        c = e.get("contention")
        if not c:
            continue
        for label in e.get("systems", []):
            q, b = med([r.get(label) for r in c["quiet"]]), med([r.get(label) for r in c["busy"]])
            if q is None or b is None:
                continue
            res.append({"file": name, "system": label, **machine(out), "quiet_ms": round(q, 2), "busy_ms": round(b, 2),
                        "busy_over_quiet": round(b / q, 2), "ratio_quiet": ratio(c["quiet"], label),
                        "ratio_busy": ratio(c["busy"], label)})
    return res


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def fr(r: dict | None) -> str:
    return "-" if not r else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def print_tables(out: dict) -> None:
    m, bw = out.get("machine", {}), out.get("bandwidth") or {}
    print(f"\n{m.get('cpu')} ({', '.join(m.get('isa') or [])}), {m.get('cores')} cores, {out.get('threads')} threads; "
          f"read bandwidth {fmt(bw.get('gbps'))} GB/s (median run {fmt(bw.get('gbps_median'))}); "
          f"llama.cpp {out.get('llama_cpp_build', {}).get('version')}")
    print("\nfiles")
    for n, f in out.get("files", {}).items():
        import gguf_files
        print(f"  {n:<16} {f['bytes'] / 2**20:>8.1f} MiB  decode reads {f['decode_bytes'] / 2**20:>7.1f} MiB/token  "
              f"{gguf_files.type_mix(f)}")
    cells = sorted({k[:-3] for r in out.get("rows", []) for k in r if k.endswith("_ms") and k != "busy_ms"},
                   key=lambda c: (c != "decode", c == "batch8", len(c), c))  # decode, prefill_*, batch8
    print("\ntiming: ms (x = millis / llama.cpp time, median [min-max] of rounds; < 1 millis faster; %bw: decode"
          " GB/s over the run's probe, %bw/r: the median over rounds of that over the round's own probe)")
    w = {c: max(9, len(c) + 3) for c in cells}
    print(f"{'file':<16} {'system':<12} " + " ".join(f"{c + ' ms':>{w[c]}} {'x':>16}" for c in cells) +
          f" {'tok/s':>7} {'GB/s':>6} {'%bw':>5} {'%bw/r':>5} {'RSS GiB':>7} {'agree':>6}")
    for r in out.get("rows", []):
        if "skipped" in r:
            print(f"{r['file']:<16} {LABEL.get(r['system'], r['system']):<12} skipped: {r['skipped'][:150]}")
            continue
        print(f"{r['file']:<16} {LABEL.get(r['system'], r['system']):<12} " +
              " ".join(f"{fmt(r.get(c + '_ms')):>{w[c]}} {fr(r.get(c + '_ratio')):>16}" for c in cells) +
              f" {fmt(r.get('decode_tok_s'), '.1f'):>7} {fmt(r.get('decode_gbps')):>6} "
              f"{fmt(r.get('decode_pct_bw'), '.0f'):>5} {fmt(r.get('decode_pct_bw_round'), '.0f'):>5} "
              f"{fmt(r.get('vmrss_gib')):>7} {r.get('decode_agree', ''):>6}")
    if out.get("ppl"):
        print(f"\nperplexity ({out.get('ppl_setup')})")
        print(f"{'file':<16} {'system':<12} {'ppl':>9} {'agree own F32':>13} {'agree millis F32':>16} {'pos/s':>7}")
        for r in out["ppl"]:
            print(f"{r['file']:<16} {LABEL.get(r['system'], r['system']):<12} {r['perplexity']:>9.3f} "
                  f"{fmt(r.get('agree_own_f32'), '.4f'):>13} {fmt(r.get('agree_millis_f32'), '.4f'):>16} "
                  f"{fmt(r.get('positions_per_s'), '.0f'):>7}")
    if out.get("greedy"):
        print("\ngreedy chat prompts: leading tokens equal to millis F32")
        for r in out["greedy"]:
            print(f"  {r['file']:<16} {LABEL.get(r['system'], r['system']):<12} "
                  f"{r.get('equal_to_millis_f32', '-')} of {r['tokens']}")
    if out.get("contention"):
        print("\ncontention: decode ms/token with one CPU-bound process beside it")
        for r in out["contention"]:
            print(f"  {r['file']:<16} {LABEL.get(r['system'], r['system']):<12} quiet {r['quiet_ms']:>8.2f}  "
                  f"busy {r['busy_ms']:>8.2f}  busy/quiet {r['busy_over_quiet']:>5.2f}  "
                  f"x quiet {fr(r['ratio_quiet'])}  x busy {fr(r['ratio_busy'])}")
    if out.get("serve"):
        s = out["serve"]
        print(f"\nserve: {s.get('command')}: ready in {s.get('ready_s')} s, VmRSS {s.get('vmrss_gib')} GiB, "
              f"VmHWM {s.get('vmhwm_gib')} GiB, requests {[q['status'] for q in s.get('requests', [])]}")

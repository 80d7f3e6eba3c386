"""CPU encoder benchmark: millis's selected variant against the peers, in one run, systems alternated.

    bash bench/peers/setup.sh            # once: peer venvs (Optimum, OpenVINO+NNCF, CTranslate2)
    .venv/bin/python bench/cpu_encoders.py [--models minilm,bert-base] [--rounds 10 --n 20]

For each model: `millis optimize` builds and selects its variant (budget: cosine >= 0.995 on 512
seeded Banking77 train texts, none of them in test.csv; calibrated on Banking77 train texts); then
every system runs in its own process (each on --threads threads) and they are timed round-robin (each round
the systems in a seeded random order, a 5 ms pause before each turn) at each shape on real Banking77 text
filling exactly b x s tokens. Embedding cosine vs torch fp32 is reported on --fidelity-texts Banking77 test
texts spread over the file (harness.banking77_spread: all 77 intents) and short ones (harness.short_texts: "ok",
"thanks", test.csv's texts of <= 3 words; cos_min_short their own min; --no-short-texts: none), which the budget
never saw. Models:
minilm (real weights), bge-small, bert-base, mpnet-base and electra-small (random weights, mean-pooled like MiniLM;
mpnet-base: all-mpnet-base-v2's shape; electra-small: 128-wide embeddings projected to 256), bge-small-cls (bge-small's weights pooled by [CLS], as bge-small-en-v1.5 is: every
system pools so; millis then runs the last layer at the [CLS] rows alone).
Writes bench/results/cpu_encoders.json after each model (`rows`: system, model, shape, p50_ms, p99_ms, cos_min,
round_p50_ms, rounds, kernels and runtime (what each row ran on), and the ratios to the fastest peers: of the
pooled p50s, and round by round, rounds_ratio_*; `meta.systems`: each system's info() per model (versions,
precision, threads, its library's settings); `meta.skipped` / `meta.failed`: systems that did not start, or
failed mid-run (their partial samples make no row: the rounds they completed and the error instead);
`meta.machine_load`: per model, the share of the CPUs other processes used while it was timed (its workers'
own excluded), the hypervisor's steal, the widest round spread of a cell, and millis.common.machine_load's
warnings). A system whose embeddings failed or were not finite has cos_min null and a `fidelity_error`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import models  # noqa: E402

from millis.common import machine_load  # noqa: E402

PEERS = ("optimum_o3_int8", "openvino_default", "openvino_nncf_int8", "ct2_int8", "fastembed")
BASELINE = "torch_eager"
# millis's C encoder, each precision as its own system
NATIVE = ("native-fp32", "native-bf16", "native-int8", "native-int8-a16", "native-int7", "native-int7-a7",
          "native-int7-row", "native-int7-row-a8", "native-int7-row-att8", "native-int8-row",
          "native-int8-row-att8")
FAITHFUL = 0.995  # the fidelity bar: peers whose cosine min vs fp32 reaches it
# a peer's library, whose kernels it runs
PEER_LIBRARY = {"torch_eager": "torch", "optimum_o3_int8": "onnxruntime", "openvino_default": "openvino",
                "openvino_nncf_int8": "openvino", "ct2_int8": "ctranslate2", "fastembed": "onnxruntime"}


def build_millis(model: str, model_dir: Path, shapes: list[str], out: Path, reuse: bool,
                 variants: tuple[str, ...] = ()) -> Path:
    """Run millis's own optimize + select for this model (in this process). `variants`: only these
    (a native system: one variant, a loose budget, timed at the target shape only)."""
    from millis.optimize.config import Budget, MeasureConfig, OptimizeConfig
    from millis.common.config import Shape
    from millis.optimize.pipeline import optimize

    from accuracy import selection_texts

    selection = selection_texts()
    if reuse and (out / "millis.json").is_file() and \
            json.loads((out / "millis.json").read_text())["config"]["sample_texts"] == str(selection):
        return out
    data = Path(harness.data_root()) / "banking77"
    measured = ["b1x128"] if variants else shapes
    cfg = OptimizeConfig(
        source=str(model_dir), task="embed", out=str(out), target=Shape(1, 128), variants=variants,
        budget=Budget(min_cosine=0.9 if variants else 0.995),
        sample_texts=str(selection),  # disjoint from the reported texts
        calibration_texts=str(data / "train.csv"),
        measure=MeasureConfig(shapes=tuple(Shape.parse(s) for s in measured), warmup=5,
                              iters=10 if variants else 60, rounds=3, max_seconds_per_cell=15.0))
    t0 = time.perf_counter()
    optimize(cfg, progress=lambda m: print(f"  [millis optimize {model}] {m}", flush=True))
    print(f"  [millis optimize {model}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def embeddings_fidelity(peers, tok, texts: list[str], short: int = 0) -> dict[str, dict]:
    """Cosine of each system's embeddings vs torch_eager's on the same padded batches: {name: {cos_min,
    cos_mean, cos_min_short}} (cos_min over all the texts, cos_min_short over the last `short`, the short ones).
    A system whose request failed, or whose embeddings or cosines are not finite (a NaN would read as
    unfaithful in every comparison and be written as bare NaN), gets None for each and its `fidelity_error`:
    one system's error never ends the run (a peer that died is then left out of the timing too)."""
    outs, errors = {}, {}
    for p in peers:
        rows = []
        try:
            for i in range(0, len(texts), 32):
                ids, mask = harness.tokenize(tok, texts[i:i + 32], max_length=256)
                rows.append(p.embed(ids, mask))
        except harness.PeerError as e:
            errors[p.name] = f"embed failed: {e}"
            print(f"  fidelity {p.name}: {errors[p.name]}", flush=True)
            continue
        emb = np.concatenate(rows)
        if not np.isfinite(emb).all():
            errors[p.name] = f"non-finite embeddings in {int((~np.isfinite(emb)).any(axis=1).sum())} of {len(emb)} rows"
            print(f"  fidelity {p.name}: {errors[p.name]}", flush=True)
            continue
        outs[p.name] = emb
    ref = outs.get(BASELINE)
    fid = {}
    for p in peers:
        if p.name in outs and ref is not None:
            c = harness.row_cosines(outs[p.name], ref)
            if np.isfinite(c).all():
                fid[p.name] = {"cos_min": float(c.min()), "cos_mean": float(c.mean()),
                               "cos_min_short": float(c[len(c) - short:].min()) if short else None}
                continue
            errors[p.name] = "non-finite cosines (an all-zero embedding row)"
        why = errors.get(p.name) or f"no reference: {BASELINE} {errors.get(BASELINE, 'not run')}"
        fid[p.name] = {"cos_min": None, "cos_mean": None, "cos_min_short": None, "fidelity_error": why}
    return fid


def run_model(model: str, a, results: list[dict], meta: dict) -> None:
    from transformers import AutoTokenizer

    model_dir = models.encoder_dir(model)
    shapes = [s.strip() for s in a.shapes.split(",")]
    systems = [s for s in a.systems.split(",") if s]
    known = {BASELINE, *PEERS, "millis", *(f"millis:{v}" for v in NATIVE)}
    if set(systems) - known:  # a misspelt or new system must not vanish from the table silently
        raise SystemExit(f"unknown systems {sorted(set(systems) - known)}; known: {sorted(known)}")
    if BASELINE not in systems:  # the fidelity reference: fail before minutes of building, not after
        raise SystemExit(f"--systems must include {BASELINE}: every cosine is measured against it")
    arts = {}
    if "millis" in systems:  # optimize's own selection over the whole catalog
        arts["millis"] = build_millis(model, model_dir, shapes, HERE / ".cache" / "millis" / model, a.reuse)
        chosen = json.loads((arts["millis"] / "millis.json").read_text())["variant"]
        meta.setdefault("millis_variant", {})[model] = chosen
    for v in NATIVE:  # built before the peers start: optimize times them on a quiet machine
        if f"millis:{v}" in systems:
            arts[f"millis:{v}"] = build_millis(model, model_dir, shapes, HERE / ".cache" / "millis" / f"{model}-{v}",
                                               a.reuse, variants=(v,))
    live, skipped = harness.start_peers([s for s in systems if not s.startswith("millis")], model_dir,
                                        threads=a.threads)
    for name, path in arts.items():
        chosen = json.loads((path / "millis.json").read_text())["variant"]["name"]
        if name != "millis" and chosen != name.split(":")[1]:
            skipped[name] = f"optimize kept {chosen}: the native variant failed or lost to the reference"
            continue
        mp = harness.Peer("millis", path, threads=a.threads, name=name)
        if mp.alive:
            live.append(mp)
        else:
            skipped[name] = mp.error
    meta.setdefault("skipped", {})[model] = skipped
    for n, why in skipped.items():
        print(f"  SKIPPED {n}: {why}", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        texts = harness.banking77_texts("test")
        inputs = {}
        for s in shapes:
            b, t = (int(x) for x in s.replace("b", "").replace("s", "").split("x"))
            inputs[(b, t)] = harness.texts_for_shape(tok, texts, b, t)
        # test.csv is sorted by intent: its first 512 rows are 13 of the 77; the spread sample covers them all
        fid_texts = harness.banking77_spread(a.fidelity_texts)
        # and short queries ("ok", "thanks", test.csv's texts of <= 3 words): a variant's fidelity holds for them too
        short = [] if a.no_short_texts else harness.short_texts()
        print(f"  fidelity on {len(fid_texts)} Banking77 test texts spread over the file and {len(short)} short "
              f"texts", flush=True)
        fid = embeddings_fidelity(live, tok, fid_texts + short, len(short))
        n = int(a.n) if a.n.isdigit() else int(dict(x.split("=") for x in a.n.split(","))[model])
        print(f"  timing {sum(p.alive for p in live)} systems x {len(shapes)} shapes, {a.rounds} rounds x {n}",
              flush=True)
        pids = [p.proc.pid for p in live if getattr(p, "proc", None) is not None]
        before = machine_load.snapshot(pids)
        done: dict[str, int] = {}
        samples = harness.run_round_robin(live, list(inputs), inputs, n_per_round=n, rounds=a.rounds, seed=a.seed,
                                          done=done)
        after = machine_load.snapshot(pids)
        spreads, infos = {}, meta.setdefault("systems", {}).setdefault(model, {})
        for p in live:
            if not p.alive:  # died or failed a request: its partial samples make no row
                rounds_done = done.get(p.name, 0)
                skipped[p.name] = f"failed after {rounds_done} of {a.rounds} rounds: {p.error}"
                meta.setdefault("failed", {}).setdefault(model, {})[p.name] = {
                    "error": p.error, "rounds_completed": rounds_done, "rounds_asked": a.rounds,
                    "samples": {f"b{b}xs{t}": len(samples.get((p.name, (b, t)), [])) for (b, t) in inputs}}
                print(f"  FAILED {p.name}: {skipped[p.name]}", flush=True)
                continue
            try:
                info = p.info()
            except harness.PeerError as e:  # its timings are whole: kept, the info's failure recorded
                info = {"info_error": str(e)}
            infos[p.name] = {k: v for k, v in info.items() if k != "ok"}
            for (b, t) in inputs:
                ms = np.asarray(samples.get((p.name, (b, t)), []))
                if ms.size == 0:
                    continue
                rounds = [float(np.median(ms[i:i + n])) for i in range(0, ms.size - n + 1, n)]  # n calls a round
                spreads[f"{p.name} b{b}xs{t}"] = max(rounds) / min(rounds) - 1 if rounds else 0.0
                row = {"system": p.name, "model": model, "shape": f"b{b}xs{t}",
                       "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                       "round_p50_ms": rounds, "rounds": len(rounds),
                       "n": int(ms.size), "cos_min": fid[p.name]["cos_min"],
                       "cos_mean": fid[p.name]["cos_mean"], "cos_min_short": fid[p.name]["cos_min_short"],
                       "precision": info.get("precision", ""),
                       "cpu": meta["hardware"]["cpu"], "isa": meta["hardware"]["isa"],
                       "kernels": kernels_of(p.name, meta, info, model), "runtime": runtime_of(p.name, info)}
                if "fidelity_error" in fid[p.name]:
                    row["fidelity_error"] = fid[p.name]["fidelity_error"]
                results.append(row)
        # what else ran meanwhile, the hypervisor's steal and the rounds' disagreement: a ratio read off a slow
        # spell of the VM is not the machine's (machine_load's limits and warnings, as optimize's report)
        load = meta.setdefault("machine_load", {})[model] = machine_load.check(before, after, spreads)
        for w in load["warnings"]:
            print(f"  WARNING {w}", flush=True)
    finally:
        for p in live:
            p.close()


def round_ratios(r: dict, peer: dict) -> dict | None:
    """r's time / peer's, round by round (each round times every system back to back): optimize's paired_ratio,
    the median and spread. A VM that slows for tens of seconds at a time (Zen 4, 2026-12-04) hits the systems of
    a round alike, so this median moves less than the ratio of pooled p50s, which a slow spell during one
    system's turns skews."""
    from millis.optimize.measure import paired_ratio

    got = paired_ratio(r.get("round_p50_ms", []), peer.get("round_p50_ms", []))
    return None if got is None else dict(zip(("median", "min", "max"), (float(x) for x in got)))


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_best_peer: p50 / the fastest peer's p50 at the same model and shape (same run); each ratio's
    round-by-round median and spread beside it (rounds_ratio_*). A row without a cosine (its fidelity failed:
    `fidelity_error`) is in no faithful set, and has no same-fidelity ratio of its own."""
    for r in rows:
        peers = [x for x in rows if x["model"] == r["model"] and x["shape"] == r["shape"] and x["system"] in PEERS]
        if peers:
            best = min(peers, key=lambda x: x["p50_ms"])
            r["best_peer"], r["ratio_vs_best_peer"] = best["system"], r["p50_ms"] / best["p50_ms"]
            faithful = [x for x in peers if x["cos_min"] is not None and x["cos_min"] >= FAITHFUL]
            if faithful:
                bf = min(faithful, key=lambda x: x["p50_ms"])
                r["best_faithful_peer"], r["ratio_vs_best_faithful_peer"] = bf["system"], r["p50_ms"] / bf["p50_ms"]
            fair = [x for x in peers if x["cos_min"] is not None and r["cos_min"] is not None
                    and x["cos_min"] >= r["cos_min"] - 1e-4]  # peers at least as faithful
            if fair:
                bf = min(fair, key=lambda x: x["p50_ms"])
                r["best_peer_same_fidelity"], r["ratio_vs_best_peer_same_fidelity"] = (bf["system"],
                                                                                       r["p50_ms"] / bf["p50_ms"])
            for key in ("best_peer", "best_faithful_peer", "best_peer_same_fidelity"):
                peer = next((x for x in peers if x["system"] == r.get(key)), None)
                if peer is not None:
                    r[f"rounds_ratio_vs_{key}"] = round_ratios(r, peer)


def print_table(rows: list[dict]) -> None:
    # x best>=.995: the pooled p50s' ratio [the median of per-round ratios, the issue's measure]
    print(f"\n{'model':9} {'shape':8} {'system':24} {'p50 ms':>8} {'p99 ms':>8} {'x best peer':>11} "
          f"{'x best>=.995':>14} {'x best >=fid':>12} {'rounds >=fid':>16} {'cos min':>8}  precision")
    for r in sorted(rows, key=lambda r: (r["model"], r["shape"], r["p50_ms"])):
        ratio = f"{r.get('ratio_vs_best_peer', float('nan')):.2f}"
        rf = r.get("rounds_ratio_vs_best_faithful_peer")
        faithful = f"{r.get('ratio_vs_best_faithful_peer', float('nan')):.2f}" + (f" [{rf['median']:.3f}]" if rf else "")
        fair = f"{r.get('ratio_vs_best_peer_same_fidelity', float('nan')):.2f}"
        rr = r.get("rounds_ratio_vs_best_peer_same_fidelity")
        rounds = f"{rr['median']:.2f} [{rr['min']:.2f}-{rr['max']:.2f}]" if rr else "-"
        cos = f"{r['cos_min']:8.5f}" if r["cos_min"] is not None else f"{'-':>8}"
        print(f"{r['model']:9} {r['shape']:8} {r['system']:24} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{ratio:>11} {faithful:>14} {fair:>12} {rounds:>16} {cos}  {r['precision'][:40]}")


def kernels_of(system: str, meta: dict, info: dict | None = None, model: str = "") -> str | None:
    """The kernels a row ran. millis: what its runner process reported (`extra.kernels`: NativeBert's build, with
    "+amx" where its matmuls ran on tiles), None when the variant is not native (an ORT / OpenVINO / torch
    variant: its library's own kernels, named in `runtime`); without that report, the build expected here for
    a native-* name. A peer: its library's own kernels, which pick the ISA at run time (named, not observed)."""
    from millis.encoder.native import on_tiles
    from millis.kernels.native import amx_expected

    extra = (info or {}).get("extra") or {}
    if not system.startswith("millis"):
        lib = PEER_LIBRARY.get(system)
        return f"{lib}'s own (ISA picked at run time)" if lib else None
    if "runtime" in extra:
        return extra.get("kernels") if extra["runtime"] == "native" else None
    name = system.split(":")[-1]
    if system == "millis":  # optimize's choice for this model
        name = (meta.get("millis_variant", {}).get(model) or {}).get("name", "")
    if not name.startswith("native-"):
        return None
    amx = on_tiles(name.removeprefix("native-"))
    return f"{meta['kernels']}+amx" if amx and amx_expected() else meta["kernels"]


def runtime_of(system: str, info: dict) -> str | None:
    """The runtime a row ran on, from its runner's info(): library, version and the settings that pick the path
    (millis: the variant's runtime and kernels; OpenVINO: precision hint, streams, threads; fastembed: ORT's
    graph level and threads; CTranslate2: its compute type)."""
    v, extra = info.get("versions") or {}, info.get("extra") or {}
    if system.startswith("millis"):
        if "runtime" not in extra:
            return None
        if extra["runtime"] == "native":
            return f"millis native {extra.get('variant')} ({extra.get('kernels')}, {extra.get('threads')} threads)"
        lib = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "torch"}.get(extra["runtime"])
        return f"millis {extra.get('variant')} on {extra['runtime']} {(v.get(lib) or '') if lib else ''}".rstrip()
    lib = PEER_LIBRARY.get(system)
    if lib is None:
        return None
    out = f"{lib} {v.get(lib) or (extra.get(lib) if isinstance(extra.get(lib), str) else '?')}"
    if system.startswith("openvino"):
        out += ", " + ", ".join(f"{k} {extra[k]}" for k in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT",
                                                              "NUM_STREAMS", "INFERENCE_NUM_THREADS") if k in extra)
    elif system == "fastembed":
        out = f"fastembed {extra.get('fastembed') or v.get('fastembed')} on {out}, " + ", ".join(
            f"{k} {extra[k]}" for k in ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads")
            if k in extra)
    elif system == "ct2_int8":
        out += f", {info.get('precision', '')}"
    elif system == "optimum_o3_int8":
        out += f" CPU EP, {info.get('precision', '')}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bge-small,bert-base")
    ap.add_argument("--shapes", default="b1xs16,b1xs128,b8xs128")
    ap.add_argument("--systems", default=",".join((BASELINE, *PEERS, "millis", *(f"millis:{v}" for v in NATIVE))))
    ap.add_argument("--rounds", type=int, default=10)  # short rounds: a slow spell of the VM spans whole rounds
    ap.add_argument("--n", default="minilm=20,bge-small=10,bge-small-cls=10,bert-base=6,mpnet-base=6,electra-small=10,"
                                   "modernbert-base=5,deberta-v3-base=5",
                    help="timed calls per system, shape and round: an int, or per model as name=n,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fidelity-texts", type=int, default=512)
    ap.add_argument("--no-short-texts", action="store_true",
                    help="fidelity on the Banking77 spread alone (runs before 2026-12-05 evening: no short texts)")
    ap.add_argument("--seed", type=int, default=0, help="seeds each round's random order of the systems")
    ap.add_argument("--reuse", action="store_true", help="reuse an existing millis artifact")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_encoders.json"))
    a = ap.parse_args()
    from millis.common import hardware

    from checkouts import write_result
    from millis.kernels.native import native_isa

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware.describe(),
            "kernels": native_isa(),  # the build millis's native kernels run here (avx2 | scalar)
            "settings": {k: v for k, v in vars(a).items() if k != "out"},
            # fidelity texts: harness.banking77_spread (every intent); runs before 2026-12-05 took test.csv's first
            # rows, 13 of the 77 intents
            "fidelity_sample": "banking77_spread" if a.no_short_texts else "banking77_spread+short",
            "models_done": []}
    rows: list[dict] = []
    for model in a.models.split(","):
        print(f"== {model}", flush=True)
        try:
            run_model(model, a, rows, meta)
        except Exception as e:  # noqa: BLE001 -- one model's failure (a build, a tokenizer) keeps the others
            import traceback

            traceback.print_exc()
            meta.setdefault("errors", {})[model] = f"{type(e).__name__}: {e}"[:2000]
        meta["models_done"].append(model)
        add_ratios(rows)
        write_result(a.out, {"meta": meta, "rows": rows}, indent=2, quiet=True)  # a later failure loses nothing
    print_table(rows)
    print(f"\nwrote {a.out}")
    if meta.get("errors"):  # the others' rows are written; the run still fails (a session script must not pass)
        print(f"FAILED: {', '.join(meta['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

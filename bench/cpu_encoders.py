"""CPU encoder benchmark: millis's selected variant against the peers, in one run, systems alternated.

    bash bench/peers/setup.sh            # once: peer venvs (Optimum, OpenVINO+NNCF, CTranslate2)
    .venv/bin/python bench/cpu_encoders.py [--models minilm,bert-base] [--rounds 10 --n 20]

For each model: `millis optimize` builds and selects its variant (budget: cosine >= 0.995 on 512
seeded Banking77 train texts, none of them in test.csv; calibrated on Banking77 train texts); then
every system runs in its own process and they are timed round-robin (round r rotates the order) at
each shape on real Banking77 text filling exactly b x s tokens. Embedding cosine vs torch fp32 is
reported on Banking77 test texts, which the budget never saw. Models: minilm (real weights), bge-small and
bert-base (random weights, mean-pooled like MiniLM), bge-small-cls (bge-small's weights pooled by [CLS], as
bge-small-en-v1.5 is: every system pools so; millis then runs the last layer at the [CLS] rows alone).
Writes bench/results/cpu_encoders.json (`rows`: system, model, shape, p50_ms, p99_ms, cos_min, round_p50_ms,
and the ratios to the fastest peers: of the pooled p50s, and round by round, rounds_ratio_*; `meta.machine_load`:
per model, the share of the CPUs other processes used while it was timed (its workers' own excluded), the
hypervisor's steal, the widest round spread of a cell, and millis.common.machine_load's warnings).
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
          "native-int7-row", "native-int7-row-a8", "native-int7-row-att8")
FAITHFUL = 0.995  # the fidelity bar: peers whose cosine min vs fp32 reaches it


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


def embeddings_fidelity(peers, tok, texts: list[str]) -> dict[str, dict[str, float]]:
    """Cosine of each system's embeddings vs torch_eager's on the same padded batches."""
    outs = {}
    for p in peers:
        rows = []
        for i in range(0, len(texts), 32):
            ids, mask = harness.tokenize(tok, texts[i:i + 32], max_length=256)
            rows.append(p.embed(ids, mask))
        outs[p.name] = np.concatenate(rows)
    ref = outs[BASELINE]
    return {n: {"cos_min": float(harness.row_cosines(e, ref).min()),
                "cos_mean": float(harness.row_cosines(e, ref).mean())} for n, e in outs.items()}


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
        print(f"  fidelity on {a.fidelity_texts} Banking77 test texts", flush=True)
        fid = embeddings_fidelity(live, tok, texts[: a.fidelity_texts])
        n = int(a.n) if a.n.isdigit() else int(dict(x.split("=") for x in a.n.split(","))[model])
        print(f"  timing {len(live)} systems x {len(shapes)} shapes, {a.rounds} rounds x {n}", flush=True)
        pids = [p.proc.pid for p in live if getattr(p, "proc", None) is not None]
        before = machine_load.snapshot(pids)
        samples = harness.run_round_robin(live, list(inputs), inputs, n_per_round=n, rounds=a.rounds)
        after = machine_load.snapshot(pids)
        spreads = {}
        for p in live:
            info = p.info()
            for (b, t) in inputs:
                ms = np.asarray(samples.get((p.name, (b, t)), []))
                if ms.size == 0:
                    continue
                rounds = [float(np.median(ms[i:i + n])) for i in range(0, ms.size - n + 1, n)]  # n calls a round
                spreads[f"{p.name} b{b}xs{t}"] = max(rounds) / min(rounds) - 1 if rounds else 0.0
                results.append({"system": p.name, "model": model, "shape": f"b{b}xs{t}",
                                "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                                "round_p50_ms": rounds,
                                "n": int(ms.size), "cos_min": fid[p.name]["cos_min"],
                                "cos_mean": fid[p.name]["cos_mean"], "precision": info.get("precision", ""),
                                "cpu": meta["hardware"]["cpu"], "isa": meta["hardware"]["isa"],
                                "kernels": kernels_of(p.name, meta)})
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
    round-by-round median and spread beside it (rounds_ratio_*)."""
    for r in rows:
        peers = [x for x in rows if x["model"] == r["model"] and x["shape"] == r["shape"] and x["system"] in PEERS]
        if peers:
            best = min(peers, key=lambda x: x["p50_ms"])
            r["best_peer"], r["ratio_vs_best_peer"] = best["system"], r["p50_ms"] / best["p50_ms"]
            faithful = [x for x in peers if x["cos_min"] >= FAITHFUL]
            if faithful:
                bf = min(faithful, key=lambda x: x["p50_ms"])
                r["best_faithful_peer"], r["ratio_vs_best_faithful_peer"] = bf["system"], r["p50_ms"] / bf["p50_ms"]
            fair = [x for x in peers if x["cos_min"] >= r["cos_min"] - 1e-4]  # peers at least as faithful
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
        print(f"{r['model']:9} {r['shape']:8} {r['system']:24} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{ratio:>11} {faithful:>14} {fair:>12} {rounds:>16} {r['cos_min']:8.5f}  {r['precision'][:40]}")


def kernels_of(system: str, meta: dict) -> str | None:
    """The kernels a millis row ran: the build, and AMX for the native variants whose matmuls run on tiles
    where the tile unit is usable (on_tiles, amx_expected)."""
    from millis.encoder.native import on_tiles
    from millis.kernels.native import amx_expected

    if not system.startswith("millis"):
        return None
    name = system.split(":")[-1]
    amx = name.startswith("native-") and on_tiles(name.removeprefix("native-"))
    return f"{meta['kernels']}+amx" if amx and amx_expected() else meta["kernels"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bge-small,bert-base")
    ap.add_argument("--shapes", default="b1xs16,b1xs128,b8xs128")
    ap.add_argument("--systems", default=",".join((BASELINE, *PEERS, "millis", *(f"millis:{v}" for v in NATIVE))))
    ap.add_argument("--rounds", type=int, default=10)  # short rounds: a slow spell of the VM spans whole rounds
    ap.add_argument("--n", default="minilm=20,bge-small=10,bge-small-cls=10,bert-base=6",
                    help="timed calls per system, shape and round: an int, or per model as name=n,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fidelity-texts", type=int, default=512)
    ap.add_argument("--reuse", action="store_true", help="reuse an existing millis artifact")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_encoders.json"))
    a = ap.parse_args()
    from millis.common import hardware

    from millis.kernels.native import native_isa

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "hardware": hardware.describe(),
            "kernels": native_isa(),  # the build millis's native kernels run here (avx2 | scalar)
            "settings": {k: v for k, v in vars(a).items() if k != "out"}}
    rows: list[dict] = []
    for model in a.models.split(","):
        print(f"== {model}", flush=True)
        run_model(model, a, rows, meta)
    add_ratios(rows)
    print_table(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

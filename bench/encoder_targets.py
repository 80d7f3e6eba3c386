"""The encoder issue's targets, cell by cell, from `bench/cpu_encoders.py` results (no timing here: it reads JSON).

    .venv/bin/python bench/encoder_targets.py bench/results/cpu_encoders_<cpu>.json [more.json ...] [--markdown]

Per model and shape, millis's fastest system whose cosine min vs fp32 reaches FAITHFUL (0.995, cpu_encoders'
bar) is held to the targets (same run, same machine):
  b1 shapes: p50 <= 0.7x the fastest peer that reaches FAITHFUL, and <= 1.0x the fastest peer of any fidelity;
  b8 shapes: throughput >= 1.2x the fastest peer at least as faithful as that millis system (time <= 1 / 1.2).
Each ratio is the median of per-round ratios where the row has them (`rounds_ratio_vs_*`: the issue's measure,
a slow spell of the VM hits both sides of a round), else the pooled p50s' ratio. Prints one line per cell and
the CPU each file was measured on; a cell no faithful millis row or no peer reaches says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_encoders import FAITHFUL  # noqa: E402

B1_FAITHFUL, B1_ANY, B8_THROUGHPUT = 0.7, 1.0, 1.2


def ratio(row: dict, key: str) -> float | None:
    """row's time over the peer named by row[best_<key>]: the rounds' median, else the pooled p50s'."""
    rounds = row.get(f"rounds_ratio_vs_{key}")
    return rounds["median"] if rounds else row.get(f"ratio_vs_{key}")


def cells(rows: list[dict]) -> list[dict]:
    """One verdict per (model, shape) with a millis row. For each target, the millis system that reaches FAITHFUL
    with the lowest ratio (its `millis`; the cell's `millis` is the fastest by p50), the ratio and whether it is
    met (None: no such peer in the run)."""
    out = []
    for model, shape in dict.fromkeys((r["model"], r["shape"]) for r in rows):
        here = [r for r in rows if r["model"] == model and r["shape"] == shape and r["system"].startswith("millis")]
        if not here:
            continue
        mine = [r for r in here if r.get("cos_min") is not None and r["cos_min"] >= FAITHFUL]
        cell = {"model": model, "shape": shape, "millis": None}
        if mine:
            m = min(mine, key=lambda r: r["p50_ms"])
            cell.update(millis=m["system"], p50_ms=m["p50_ms"], cos_min=m["cos_min"])
            targets = ((("faithful", "best_faithful_peer", B1_FAITHFUL), ("any", "best_peer", B1_ANY))
                       if shape.startswith("b1") else (("throughput", "best_peer_same_fidelity", B8_THROUGHPUT),))
            for name, key, bar in targets:
                got = [(ratio(r, key), r) for r in mine if ratio(r, key)]
                if not got:
                    cell[name] = {"peer": None, "ratio": None, "bar": bar, "met": None, "millis": None}
                    continue
                x, r = min(got, key=lambda g: g[0])
                value = 1.0 / x if name == "throughput" else x  # throughput: the peer's time over millis's
                cell[name] = {"peer": r.get(key), "ratio": value, "bar": bar, "millis": r["system"],
                              "met": value >= bar if name == "throughput" else value <= bar}
        out.append(cell)
    return out


def verdict(t: dict | None) -> str:
    if not t or t["ratio"] is None:
        return "no peer"
    return f"{t['ratio']:.3f}x {'met' if t['met'] else 'NOT met'} ({t['millis'][7:]} / {t['peer']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/cpu_encoders.py JSON files")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (for docs) instead of plain lines")
    a = ap.parse_args()
    if a.markdown:
        print("| CPU | model | shape | fastest faithful millis (cosine) | <= 0.7x faithful peer | <= 1.0x any peer | >= 1.2x b8 throughput |")
        print("|---|---|---|---|---|---|---|")
    for path in a.results:
        data = json.loads(Path(path).read_text())
        first = data["rows"][0] if data["rows"] else {}
        cpu = f"{first.get('cpu', '?')} {'+'.join(first.get('isa', []))}"
        if not a.markdown:
            print(f"== {path}: {cpu}, {data['meta'].get('date', '')}, fidelity {data['meta'].get('fidelity_sample', '')}")
        for c in cells(data["rows"]):
            who = f"{c['millis'][7:]} {c['p50_ms']:.2f} ms ({c['cos_min']:.4f})" if c["millis"] else "no faithful millis row"
            cols = [verdict(c.get("faithful")), verdict(c.get("any"))] if c["shape"].startswith("b1") \
                else ["", "", verdict(c.get("throughput"))]
            if c["shape"].startswith("b1"):
                cols.append("")
            if a.markdown:
                print(f"| {cpu} | {c['model']} | {c['shape']} | {who} | " + " | ".join(cols) + " |")
            else:
                print(f"{c['model']:10} {c['shape']:8} {who:32} " + "  ".join(x for x in cols if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())

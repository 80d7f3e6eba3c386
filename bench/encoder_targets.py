"""The encoder issue's targets, cell by cell, from `bench/cpu_encoders.py` results (no timing here: it reads JSON).

    .venv/bin/python bench/encoder_targets.py bench/results/cpu_encoders_<cpu>.json [more.json ...] [--markdown]

Per model and shape, millis's fastest system whose cosine min vs fp32 reaches FAITHFUL (0.995, cpu_encoders'
bar) is held to the targets (same run, same machine):
  b1 shapes: p50 <= 0.7x the fastest peer that reaches FAITHFUL, and <= 1.0x the fastest peer of any fidelity;
  b8 shapes: throughput >= 1.2x the fastest peer at least as faithful as that millis system (time <= 1 / 1.2).
Each millis row is held to every eligible peer, each by the median of per-round ratios where both have rounds (the
issue's measure: a slow spell of the VM hits both sides of a round), else the pooled p50s' ratio, and its ratio is
the one against its hardest peer (the fastest peer by pooled p50 need not be the hardest round by round). Prints one line per cell and
the CPU each file was measured on; a cell no faithful millis row or no peer reaches says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_encoders import FAITHFUL, PEERS  # noqa: E402

B1_FAITHFUL, B1_ANY, B8_THROUGHPUT = 0.7, 1.0, 1.2


def ratio(row: dict, peer: dict) -> float | None:
    """row's time over peer's: the median of per-round ratios where both have rounds, else the pooled p50s'."""
    from millis.optimize.measure import paired_ratio

    got = paired_ratio(row.get("round_p50_ms") or [], peer.get("round_p50_ms") or [])
    if got is not None:
        return float(got[0])
    return row["p50_ms"] / peer["p50_ms"] if peer.get("p50_ms") else None


def eligible(name: str, mine: dict, peers: list[dict]) -> list[dict]:
    """The peers a target holds `mine` to: faithful ones (cosine min >= FAITHFUL), any, or (b8) those at least as
    faithful as `mine`."""
    cos = [p for p in peers if p.get("cos_min") is not None]
    if name == "faithful":
        return [p for p in cos if p["cos_min"] >= FAITHFUL]
    if name == "throughput":
        return [p for p in cos if p["cos_min"] >= mine["cos_min"] - 1e-4]
    return peers


def worst(name: str, mine: dict, peers: list[dict]) -> tuple[float, str] | None:
    """(mine's time ratio against its slowest-to-beat eligible peer, that peer): every eligible peer is held to,
    each by its own per-round median (the fastest by pooled p50 need not be the hardest round by round)."""
    got = [(x, p["system"]) for p in eligible(name, mine, peers) if (x := ratio(mine, p)) is not None]
    return max(got) if got else None


def cells(rows: list[dict]) -> list[dict]:
    """One verdict per (model, shape) with a millis row. For each target, the millis system that reaches FAITHFUL
    with the lowest ratio against its hardest eligible peer (its `millis`; the cell's `millis` is the fastest by
    p50), the ratio, that peer, and whether it is met (None: no such peer in the run)."""
    out = []
    for model, shape in dict.fromkeys((r["model"], r["shape"]) for r in rows):
        here = [r for r in rows if r["model"] == model and r["shape"] == shape]
        peers = [r for r in here if r["system"] in PEERS]
        ours = [r for r in here if r["system"].startswith("millis")]
        if not ours:
            continue
        mine = [r for r in ours if r.get("cos_min") is not None and r["cos_min"] >= FAITHFUL]
        cell = {"model": model, "shape": shape, "millis": None}
        if mine:
            m = min(mine, key=lambda r: r["p50_ms"])
            cell.update(millis=m["system"], p50_ms=m["p50_ms"], cos_min=m["cos_min"])
            targets = (("faithful", B1_FAITHFUL), ("any", B1_ANY)) if shape.startswith("b1") else \
                (("throughput", B8_THROUGHPUT),)
            for name, bar in targets:
                got = [(w, r) for r in mine if (w := worst(name, r, peers)) is not None]
                if not got:
                    cell[name] = {"peer": None, "ratio": None, "bar": bar, "met": None, "millis": None}
                    continue
                (x, peer), r = min(got, key=lambda g: g[0][0])
                value = 1.0 / x if name == "throughput" else x  # throughput: the peer's time over millis's
                cell[name] = {"peer": peer, "ratio": value, "bar": bar, "millis": r["system"],
                              "met": value >= bar if name == "throughput" else value <= bar}
        out.append(cell)
    return out


def verdict(t: dict | None) -> str:
    if not t or t["ratio"] is None:
        return "no peer"
    return f"{t['ratio']:.3f}x {'met' if t['met'] else 'NOT met'} ({shown(t['millis'])} / {t['peer']})"


def shown(system: str) -> str:
    """A millis system's name without the "millis:" prefix (the default system is "millis" itself)."""
    return system.removeprefix("millis:")


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
        cpu_id = data["meta"].get("hardware", {}).get("cpu_id") or first.get("cpu_id", "")
        cpu = f"{first.get('cpu', '?')}{f' ({cpu_id})' if cpu_id else ''} {'+'.join(first.get('isa', []))}"
        if not a.markdown:
            print(f"== {path}: {cpu}, {data['meta'].get('date', '')}, fidelity {data['meta'].get('fidelity_sample', '')}")
        for c in cells(data["rows"]):
            who = f"{shown(c['millis'])} {c['p50_ms']:.2f} ms ({c['cos_min']:.4f})" if c["millis"] else \
                "no faithful millis row"
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

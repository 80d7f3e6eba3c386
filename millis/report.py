"""Reports beside the artifact: report.json (everything), report.md (tables), latency.png (plot)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["facts"] = {k: v for k, v in row.get("facts", {}).items() if k != "dir"}  # temp paths
    return row


def fidelity_text(task: str, fid: dict[str, float]) -> str:
    if not fid:
        return "-"
    if task == "classify":
        return f"dlogit {fid['max_logit_diff']:.2e}, top1 {fid['top1_agreement']:.3f}"
    return f"cos min {fid['cos_min']:.5f}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], chosen: str) -> str:
    task, shapes = meta["task"], list(next((r["latency"] for r in rows if r["latency"]), {}).keys())
    hw = meta["hardware"]
    lines = [f"# millis report: {meta['source']['spec']} ({task})", "",
             f"Chosen: **{chosen}** (fastest at {meta['measured']['target']} within the fidelity budget).", "",
             f"Machine: {hw['cpu']}, {hw['cores']} cores, ISA {' '.join(hw['isa']) or '-'}; "
             f"millis {meta['millis_version']}.", "",
             "p50 / p99 latency in ms per shape; fidelity against torch fp32 on the sample texts; cold start = "
             "load + first call at the target shape; RSS MB = resident memory added by loading the variant.", "",
             "| variant | runtime | precision | " + " | ".join(shapes) + " | fidelity | ok | cold start s | file MB | RSS MB |",
             "|---|---|---|" + "---|" * len(shapes) + "---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['latency'][s]['p50_ms']:.2f} / {r['latency'][s]['p99_ms']:.2f}" if s in r["latency"] else "-"
                 for s in shapes]
        mark = "**" if r["name"] == chosen else ""
        ok = "yes" if r["ok"] else f"no: {r['reason']}"
        size = r["facts"].get("bytes")
        size_txt = f"{size / 2**20:.1f}" if size else "-"
        lines.append(f"| {mark}{r['name']}{mark} | {r['runtime']} | {r['precision']} | " + " | ".join(cells) +
                     f" | {fidelity_text(task, r['fidelity'])} | {ok} | "
                     f"{r['cold_start'].get('total_s', float('nan')):.2f} | {size_txt} | {r.get('rss_mb', 0):.0f} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Skipped variants:", ""] + [f"- {r['name']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(path: Path, task: str, rows: list[dict[str, Any]], chosen: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["latency"]]
    shapes = list(rows[0]["latency"].keys()) if rows else []
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(4.5 * max(1, len(shapes)), 4.2), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        names = [r["name"] for r in rows]
        p50 = np.array([r["latency"][s]["p50_ms"] for r in rows])
        p99 = np.array([r["latency"][s]["p99_ms"] for r in rows])
        colors = ["tab:green" if r["name"] == chosen else ("tab:blue" if r["ok"] else "lightgray") for r in rows]
        y = np.arange(len(rows))
        ax.barh(y, p50, color=colors, xerr=[np.zeros_like(p50), p99 - p50], capsize=2)
        for i, r in enumerate(rows):
            ax.text(p50[i], i, "" if r["ok"] else "  fidelity x", va="center", fontsize=7, color="tab:red")
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{s}: p50 (bar) to p99 (whisker)", fontsize=9)
        ax.set_xscale("log")  # eager is often 10x the rest
        ax.set_xlabel("ms (log)")
    fig.suptitle(f"millis variants ({task}); green = chosen, gray = outside fidelity budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], chosen: str) -> None:
    rows = [_clean(r) for r in rows]
    (out / "report.json").write_text(json.dumps({"chosen": chosen, "task": meta["task"], "source": meta["source"],
                                                 "hardware": meta["hardware"], "variants": rows}, indent=2))
    (out / "report.md").write_text(markdown(meta, rows, chosen))
    plot(out / "latency.png", meta["task"], rows, chosen)

"""Reports beside the artifact: report.json (everything), report.md (tables), latency.png and
pareto.png (p50 at the target shape against accuracy, or fidelity without labelled data)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from millis.artifact.meta import ArtifactMeta
from millis.common.config import to_dict
from millis.optimize.config import OptimizeConfig, optimize_config_from_dict
from millis.optimize.select import NEAR_TIE, finer_than_a_row, reference_fallback


def fidelity_text(task: str, fid: dict[str, float]) -> str:
    if not fid:
        return "-"
    if task == "classify":
        order = f", order {fid['order_agreement']:.3f}" if "order_agreement" in fid else ""  # a reranker's, by query
        return f"dlogit {fid['max_logit_diff']:.2e}, top1 {fid['top1_agreement']:.3f}{order}"
    return f"cos min {fid['cos_min']:.5f}"


def accuracy_text(row: dict[str, Any]) -> str:
    """Accuracy, its change against fp32 and the rows whose prediction is not fp32's (a drop of 0 may be 5 rows
    gone wrong and 5 gone right)."""
    a = row.get("accuracy") or {}
    if not a:
        return "-"
    f = row.get("flipped") or {}
    flips = f"; {f['rows']} flipped, {100 * f['share']:.2f}%" if f else ""
    return f"{100 * a['accuracy']:.2f}% ({0.0 - a['drop_pts']:+.2f} pt{flips})"


def rss_text(row: dict[str, Any]) -> str:
    mb = row.get("rss_mb")
    return "-" if mb is None else f"{mb:.0f}"


def serve_mix_text(mix: dict[str, Any] | None) -> str:
    if not mix:
        return "-"
    return f"{mix['rows_per_s']:.1f} ({mix['worst_ms']:.0f} ms)"


def recovery_lines(recovery: dict[str, Any]) -> list[str]:
    if not recovery.get("needed"):
        return ["", f"Recovery: not needed ({recovery.get('why', '-')}).", ""]
    lines = ["", "## Recovery", "", f"Plain int8 missed the budget ({recovery['why']}); millis tried:", "",
             "| step | variant | within budget | why |", "|---|---|---|---|"]
    for a in recovery["attempts"]:
        lines.append(f"| {a['step']} | {a['variant']} | {'yes' if a['ok'] else 'no'} | {a['reason']} |")
    kept = recovery.get("kept_fp32")
    if kept:
        lines += ["", f"Nodes kept in fp32 by `ort-int8-mixed` ({len(kept)} of {len(recovery['sensitivity'])}; "
                  f"fp32 because ONNX Runtime's CPU MatMul has no bf16 kernel):", "",
                  "| node | output error when quantized alone | why |", "|---|---|---|"]
        lines += [f"| `{k['node']}` | {k['error']:.3e} | {k['why']} |" for k in kept]
    elif "sensitivity" in recovery:
        lines += ["", "The sensitivity fallback found no node set within budget below all-fp32."]
    return lines + [""]


def speedup_text(rows: list[dict[str, Any]], row: dict[str, Any], shape: str) -> str:
    """Speed-up over torch fp32 at `shape`: the median of per-round ratios [min-max] (interleaved pairs)."""
    from millis.optimize.build.variants import REFERENCE
    from millis.optimize.measure import paired_ratio

    ref = next((r for r in rows if r["name"] == REFERENCE), None)
    got = paired_ratio((ref or {}).get("latency", {}).get(shape, {}).get("round_p50_ms") or [],
                       row.get("latency", {}).get(shape, {}).get("round_p50_ms") or [])
    return f"{got[0]:.2f}x [{got[1]:.2f}-{got[2]:.2f}]" if got else "-"


def calls_text(rows: list[dict]) -> str:
    """How many timed calls each p50 / p99 is of: a p99 of 10 calls is close to their maximum, so say so."""
    ns = sorted({c["n"] for r in rows for c in (r.get("latency") or {}).values() if "n" in c})
    if not ns:
        return "calls not recorded"
    few = " (under 100: the p99 is near the slowest call)" if ns[0] < 100 else ""
    return f"{ns[0]} timed calls per cell{'' if len(ns) == 1 else f' to {ns[-1]}'}{few}"


def selection_rows(rows: list[dict[str, Any]]) -> int:
    """How many labelled rows selection judged accuracy on (0: none, the fidelity gate)."""
    return max((int((r.get("accuracy") or {}).get("n", 0)) for r in rows), default=0)


def warnings_of(rows: list[dict[str, Any]], chosen: str, max_drop: float | None) -> list[str]:
    """The report's bold warnings: the fp32 reference shipped because nothing met the budget; a --max-drop finer
    than one selection row (`max_drop` None: not known)."""
    out = [w for w in [reference_fallback(rows, chosen)] if w]
    n = selection_rows(rows)
    if n and max_drop is not None and (coarse := finer_than_a_row(max_drop, n)):
        out.append(coarse)
    return out


def batching_text(rows: list[dict[str, Any]]) -> str:
    """How each gate batched the rows (report.json's `batching` of each variant; "" for a report written before it):
    a variant whose rows share an activation scale a call (ORT's dynamic int8) gives other outputs at other
    batchings, so it was judged at one row a call too, and the worse kept."""
    judged = [r for r in rows if r.get("batching")]
    if not judged:
        return ""
    b = judged[0]["batching"]
    text = (f"Batching: fidelity in calls of {b['fidelity_rows_per_call'][0]} rows" +
            (f", accuracy in calls of {b['accuracy_rows_per_call'][0]} rows sorted by length"
             if "accuracy_rows_per_call" in b else "") + ". ")
    shared = [r for r in judged if r["batching"].get("shares_scales_across_rows")]
    if not shared:
        return text + "No variant's rows share an activation scale, so no verdict depends on the batching."
    at = "; ".join(f"{r['name']} " + ", ".join(f"{100 * a:.2f}% at {k} a call"
                                               for k, a in r["batching"]["accuracy_at"].items())
                   for r in shared if r["batching"].get("accuracy_at"))
    return (text + f"{', '.join(r['name'] for r in shared)}: one activation scale per call (dynamic int8), so a "
            f"row's outputs depend on its batch-mates; judged at one row a call too, the worse kept"
            + (f" (accuracy {at})" if at else "") + ".")


def notes(rows: list[dict[str, Any]], target: str, fidelity_texts: str, selection_data: str) -> list[str]:
    """The variant table's notes, one paragraph each: report.md's and report.html's alike."""
    acc = (f"accuracy = validation (selection) accuracy on the labelled rows selection chose on ({selection_data}), "
           f"its change against fp32 and the rows whose prediction flipped from fp32's in brackets: the rows chose the "
           f"variant, so it is no test score (run `millis eval ARTIFACT --data TEST` on rows selection never saw); "
           if any(r.get("accuracy") for r in rows) else "")
    return [f"p50 / p99 latency in ms per shape ({calls_text(rows)}); fidelity against torch fp32 on "
            f"{fidelity_texts or 'the sample texts'}; {acc}cold start = load + first call at the target shape, "
            "runtime already imported; RSS MB = resident memory that loading the variant and one call add to a fresh "
            "process that imported its runtime (the runtime's one-off setup included); serve mix = rows/s over shapes a server forms that the variant had "
            "not run, each cold then warm (worst call in brackets).",
            *[t for t in [batching_text(rows)] if t],
            f"x fp32 = speed-up over torch fp32 at {target}: the median of per-round ratios "
            "(variants interleaved), [min-max] over rounds."]


def load_lines(load: Any) -> list[str]:
    if load is None:
        return []
    lines = [f"While measuring, other processes used {100 * load.other_share:.0f}% of the CPUs, the hypervisor "
             f"stole {100 * load.steal_share:.0f}%, and the widest round spread was {100 * load.max_spread:.0f}%.", ""]
    return lines + [f"**Warning: {w}.**" for w in load.warnings] + ([""] if load.warnings else [])


def config_of(meta: ArtifactMeta) -> OptimizeConfig:
    """The OptimizeConfig that built the artifact (budget, selection data...)."""
    return optimize_config_from_dict(meta.config)


def markdown(meta: ArtifactMeta, rows: list[dict[str, Any]], chosen: str, recovery: dict[str, Any]) -> str:
    task, shapes = meta.task, list(next((r["latency"] for r in rows if r["latency"]), {}).keys())
    hw, m, cfg = meta.hardware, meta.measured, config_of(meta)
    gate = (f"within {cfg.budget.max_drop} accuracy points of fp32 on {m.selection_data or cfg.data}"
            if m.accuracy else "within the fidelity budget")
    warned = [f"**Warning: {w}.**" for w in warnings_of(rows, chosen, cfg.budget.max_drop)]
    lines = [f"# millis report: {meta.source.spec} ({task})", ""] + [x for w in warned for x in (w, "")] + [
             f"Chosen: **{chosen}** (fastest at {m.target} {gate}, not stalling on new shapes; "
             f"p50s within {100 * NEAR_TIE:.0f}% of the fastest tie, and a tie goes to the most serve-mix rows/s).", "",
             f"Machine: {hw.cpu}{f' ({hw.cpu_id})' if hw.cpu_id else ''}, {hw.cores} cores, "
             f"ISA {' '.join(hw.isa) or '-'}; millis {meta.millis_version}.", ""] + \
        [x for n in notes(rows, m.target, m.fidelity_texts, m.selection_data or cfg.data) for x in (n, "")] + \
        load_lines(m.load) + [
             "| variant | runtime | precision | " + " | ".join(shapes) +
             " | x fp32 | serve mix rows/s | fidelity | accuracy | ok | cold start s | file MB | RSS MB |",
             "|---|---|---|" + "---|" * len(shapes) + "---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['latency'][s]['p50_ms']:.2f} / {r['latency'][s]['p99_ms']:.2f}" if s in r["latency"] else "-"
                 for s in shapes]
        mark = "**" if r["name"] == chosen else ""
        ok = "yes" if r["ok"] else f"no: {r['reason']}"
        size = r["facts"].get("bytes")
        size_txt = f"{size / 2**20:.1f}" if size else "-"
        lines.append(f"| {mark}{r['name']}{mark} | {r['runtime']} | {r['precision']} | " + " | ".join(cells) +
                     f" | {speedup_text(rows, r, m.target)} | {serve_mix_text(r.get('serve_mix'))} | "
                     f"{fidelity_text(task, r['fidelity'])} | "
                     f"{accuracy_text(r)} | {ok} | "
                     f"{r['cold_start'].get('total_s', float('nan')):.2f} | {size_txt} | {rss_text(r)} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Skipped variants:", ""] + [f"- {r['name']}: {r['error']}" for r in errors]
    lines += recovery_lines(recovery)
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
            ax.text(p50[i], i, "" if r["ok"] else "  rejected", va="center", fontsize=7, color="tab:red")
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{s}: p50 (bar) to p99 (whisker)", fontsize=9)
        ax.set_xscale("log")  # eager is often 10x the rest
        ax.set_xlabel("ms (log)")
    fig.suptitle(f"millis variants ({task}); green = chosen, gray = outside budget or rejected on the serve mix",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto(path: Path, meta: ArtifactMeta, rows: list[dict[str, Any]], chosen: str) -> None:
    """p50 at the target shape (x, log) against accuracy, or fidelity without labelled data (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target, budget = meta.measured.target, config_of(meta).budget
    rows = [r for r in rows if target in r["latency"]]
    if meta.measured.accuracy and meta.measured.reference_accuracy is not None:
        key, label = (lambda r: 100 * r["accuracy"]["accuracy"]), "accuracy on the labelled data (%)"
        line = 100 * meta.measured.reference_accuracy - budget.max_drop
    elif meta.task == "embed":
        key, label, line = (lambda r: r["fidelity"]["cos_min"]), "cosine min vs fp32", budget.min_cosine
    else:
        key, label, line = (lambda r: r["fidelity"]["top1_agreement"]), "top-1 agreement with fp32", \
            budget.min_top1_agreement
    def value(r: dict[str, Any]) -> float | None:  # None: not scored (NaN outputs: no accuracy was computed)
        try:
            return key(r)
        except (KeyError, TypeError):
            return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (r, y) in enumerate((r, y) for r in rows if (y := value(r)) is not None):
        x = r["latency"][target]["p50_ms"]
        color = "tab:green" if r["name"] == chosen else ("tab:blue" if r["ok"] else "tab:gray")
        ax.scatter([x], [y], s=90 if r["name"] == chosen else 40, color=color,
                   marker="*" if r["name"] == chosen else "o", zorder=3)
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(4, 3 if i % 2 else -9),  # alternate: equal
                    textcoords="offset points")                                # accuracies overlap
    ax.axhline(line, color="tab:red", linestyle="--", linewidth=1, label="budget")
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 ms at {target} (log)")
    ax.set_ylabel(label)
    ax.set_title(f"millis variants ({meta.task}): green star = chosen, gray = outside budget or rejected "
                 "on the serve mix", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out: Path, meta: ArtifactMeta, rows: list[dict[str, Any]], chosen: str,
              recovery: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps({"chosen": chosen, "task": meta.task, "source": to_dict(meta.source),
                                                 "hardware": to_dict(meta.hardware), "measured": to_dict(meta.measured),
                                                 "variants": rows, "recovery": recovery,
                                                 # why the fp32 reference shipped ("" when a variant met the budget)
                                                 "fallback": reference_fallback(rows, chosen)}, indent=2))
    (out / "report.md").write_text(markdown(meta, rows, chosen, recovery))
    plot(out / "latency.png", meta.task, rows, chosen)
    pareto(out / "pareto.png", meta, rows, chosen)

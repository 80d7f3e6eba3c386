"""report.html: one self-contained page from an artifact's report.json (`millis report`, and the end of
`millis optimize`).

What report.md holds (the variant table, recovery, measurement trust, the machine) plus inline SVG charts:
the Pareto plot (p50 at the target shape against accuracy, or fidelity without labelled data) and one
latency CDF per shape. No scripts, fonts, styles or images are fetched; every string from the artifact is
HTML-escaped. report.json is the source of truth; millis.json beside it, when readable, adds the budget
(the Pareto plot's line), the millis version and the build time.

report.html is a view, not part of the artifact: it is written after millis.json hashed the files, so
rewriting it never makes an artifact look corrupted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from millis.common.errors import MillisError
from millis.common.files import replace_text
from millis.optimize import svg
from millis.optimize.report import (accuracy_text, fidelity_text, notes, rss_text, serve_mix_text, speedup_text,
                                    warnings_of)
from millis.optimize.select import NEAR_TIE
from millis.optimize.svg import esc

REPORT = "report.json"
HTML = "report.html"
CDF_LEVELS = (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99))  # reports written before cdf_ms


def cdf_points(c: dict[str, Any]) -> list[tuple[float, float]]:
    """(ms, share of calls at or below): the 21 stored levels 0%, 5%, ..., 100% (`cdf_ms`), or the
    p50 / p95 / p99 of a report written before them."""
    if c.get("cdf_ms"):
        n = len(c["cdf_ms"]) - 1
        return [(x, i / n) for i, x in enumerate(c["cdf_ms"]) if math.isfinite(x)]
    return [(c[k], q) for k, q in CDF_LEVELS if k in c and math.isfinite(c[k])]
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
 padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:.6em 0}th,td{border:1px solid #ddd;padding:3px 7px}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#e8f5e9;font-weight:600}tr.rejected td{color:#777}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px;margin:.4em 0}
figure{margin:1em 0}figcaption{font-size:12px;color:#555;max-width:720px}
svg text{font-size:11px;fill:#333}svg .title{font-size:12px;font-weight:600}svg .label{font-size:12px}
svg .plot{fill:#fff;stroke:#999}svg .grid{stroke:#eee}code{font-size:12px}
"""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_report(artifact_dir: Path) -> dict[str, Any]:
    """report.json of `artifact_dir`; a MillisError naming the file when it is missing or not a report."""
    path = artifact_dir / REPORT
    if not path.is_file():
        raise MillisError(f"{path} not found: `millis report` reads the report.json that `millis optimize` "
                          f"writes into an artifact directory")
    data = read_json(path)
    if data is None or not isinstance(data.get("variants"), list):
        raise MillisError(f"{path} is not a millis report.json (unreadable, or no 'variants' list)")
    return data


def shapes_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every measured shape, in the order the variants list them."""
    out: list[str] = []
    for r in rows:
        out += [s for s in r.get("latency") or {} if s not in out]
    return out


def pareto_axis(rep: dict[str, Any], budget: dict[str, Any]) -> tuple[str, Any, float | None]:
    """(y label, row -> y value or None, budget line or None), as report.py's pareto.png chooses them."""
    m, task = rep.get("measured") or {}, rep.get("task")

    def pick(section: str, key: str, scale: float = 1.0):
        def get(r: dict[str, Any]) -> float | None:
            v = (r.get(section) or {}).get(key)
            return None if v is None else scale * float(v)
        return get

    if m.get("accuracy") and m.get("reference_accuracy") is not None:
        line = 100 * m["reference_accuracy"] - budget["max_drop"] if "max_drop" in budget else None
        return "accuracy on the labelled data (%)", pick("accuracy", "accuracy", 100.0), line
    if task == "embed":
        return "cosine min vs fp32", pick("fidelity", "cos_min"), budget.get("min_cosine")
    return "top-1 agreement with fp32", pick("fidelity", "top1_agreement"), budget.get("min_top1_agreement")


def color_of(r: dict[str, Any], chosen: str, i: int, grey_rejected: bool = False) -> str:
    """Green for the chosen variant; else the i-th palette colour (grey when rejected, where asked)."""
    if r["name"] == chosen:
        return svg.CHOSEN
    return svg.REJECTED if grey_rejected and not r.get("ok") else svg.PALETTE[i % len(svg.PALETTE)]


def pareto_chart(rep: dict[str, Any], budget: dict[str, Any]) -> str:
    rows, chosen = rep["variants"], rep.get("chosen", "")
    target = (rep.get("measured") or {}).get("target", "")
    label, y_of, line = pareto_axis(rep, budget)
    pts = [(r, r["latency"][target]["p50_ms"], y_of(r)) for r in rows if target in (r.get("latency") or {})]
    missing = [r["name"] for r, _, y in pts if y is None]
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    # NaN / inf (a diverged variant) would write cx="nan": listed under the chart instead
    broken = [r["name"] for r, x, y in pts if y is not None and not (finite(x) and finite(y))]
    pts = [(r, x, y) for r, x, y in pts if y is not None and finite(x) and finite(y)]
    line = line if line is None or finite(line) else None
    ys = [y for _, _, y in pts] + ([line] if line is not None else [])
    f = svg.frame("pareto", f"p50 at {target} against {label.split(' (')[0]}", f"p50 ms at {target} (log)",
                  label, svg.value_range([x for _, x, _ in pts], log=True), svg.value_range(ys, log=False, pad=0.15),
                  x_log=True, width=760, height=440)
    body = svg.hline(f, line, "#c62828", "budget") if line is not None else []
    for i, (r, x, y) in enumerate(pts):
        star = r["name"] == chosen
        state = "chosen" if star else ("within budget" if r.get("ok") else f"rejected: {r.get('reason', '')}")
        body.append(svg.marker(f.x.at(x), f.y.at(y), color_of(r, chosen, i, grey_rejected=True),
                               f"{r['name']}: {x:.3g} ms, {y:.5g} ({state})", star=star, name=r["name"]))
    # the chosen variant's label first, so it is never the one left out
    order = sorted(pts, key=lambda p: p[0]["name"] != chosen)
    labels, left_out = svg.place_labels(f, [(f.x.at(x), f.y.at(y), r["name"]) for r, x, y in order])
    body += labels
    note = f" Not plotted (no {label.split(' (')[0]}): {', '.join(missing)}." if missing else ""
    if broken:
        note += f" Not plotted (p50 or {label.split(' (')[0]} not a finite number): {', '.join(broken)}."
    if left_out:
        note += f" {left_out} label(s) left out where they would overlap: hover a point for its name."
    caption = (f"Each variant measured at {target}: x = its p50 (log scale), y = {label}. Green star = chosen; "
               f"grey = outside the budget or rejected on the serve mix; dashed red = the budget."
               f"{note}")
    return figure(svg.render(f, body, len(pts)), caption)


def cdf_chart(rep: dict[str, Any], shape: str) -> str:
    """A latency CDF at `shape` per variant, from the quantiles report.json stores (no raw samples)."""
    rows, chosen = rep["variants"], rep.get("chosen", "")
    cells = [(i, r, r["latency"][shape]) for i, r in enumerate(rows) if shape in (r.get("latency") or {})]
    xs = [x for _, _, c in cells for x, _ in cdf_points(c)]
    full = all(c.get("cdf_ms") for _, _, c in cells)
    f = svg.frame(f"cdf-{shape}", f"latency CDF at {shape}", "ms per call (log)", "share of calls at or below",
                  svg.value_range(xs, log=True), (0.0 if full else 0.45, 1.0), x_log=True, width=760, height=360,
                  right=220)
    body, entries, points = [], [], 0
    for i, r, c in cells:
        color, star = color_of(r, chosen, i), r["name"] == chosen
        level = cdf_points(c)
        # a step CDF: flat until the next stored percentile, then up to its share
        steps = [(f.x.at(x), f.y.at(q)) for x, q in level]
        path = [p for a, b in zip(steps, steps[1:]) for p in (a, (b[0], a[1]))] + steps[-1:]
        body.append(svg.polyline(path, color, 2.6 if star else 1.4, "" if r.get("ok") else "4 3"))
        for x, q in level:
            body.append(svg.marker(f.x.at(x), f.y.at(q), color, f"{r['name']}: p{round(100 * q)} {x:.3g} ms "
                                   f"({c.get('n', '?')} calls)", name=r["name"]))
            points += 1
        entries.append((r["name"] + (" (chosen)" if star else "" if r.get("ok") else " (rejected)"), color))
    body += svg.legend(f, entries)
    kept = ("the latency at every 5% of calls (0% = fastest, 100% = slowest)" if full else
            "p50, p95 and p99 only (a step CDF from 50% up: this report predates the 5% levels)")
    caption = (f"Latency at {shape}, per variant (dashed: outside the budget or rejected). report.json keeps "
               f"{kept}, not every call; each line joins them. Calls per variant in the point tooltips.")
    return figure(svg.render(f, body, points), caption)


def figure(chart: str, caption: str) -> str:
    return f"<figure>{chart}<figcaption>{esc(caption)}</figcaption></figure>"


def table(head: list[str], rows: list[list[str]], row_attrs: list[str] | None = None) -> str:
    """An HTML table; `head` and cells are already-escaped HTML, `row_attrs` extra <tr> attributes."""
    attrs = row_attrs or [""] * len(rows)
    body = "".join(f"<tr{a}>" + "".join(rows_cell(c) for c in row) + "</tr>" for a, row in zip(attrs, rows))
    return "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr></thead><tbody>{body}</tbody></table>"


def rows_cell(cell: str) -> str:
    numeric = cell[:1].isdigit() or (cell[:1] == "-" and cell[1:2].isdigit())
    return f'<td class="n">{cell}</td>' if numeric else f"<td>{cell}</td>"


def variant_table(rep: dict[str, Any]) -> str:
    rows, chosen, task = rep["variants"], rep.get("chosen", ""), rep.get("task", "")
    target, shapes = (rep.get("measured") or {}).get("target", ""), shapes_of(rep["variants"])
    head = ["variant", "runtime", "precision"] + [f"{esc(s)} p50 / p99 ms" for s in shapes] + \
        ["x fp32", "serve mix rows/s", "fidelity", "accuracy", "ok", "cold start s", "file MB", "RSS MB"]
    out, attrs = [], []
    for r in rows:
        lat = r.get("latency") or {}
        cells = [f"{lat[s]['p50_ms']:.2f} / {lat[s]['p99_ms']:.2f}" if s in lat else "-" for s in shapes]
        size = (r.get("facts") or {}).get("bytes")
        ok = "yes" if r.get("ok") else f"no: {r.get('reason', '')}"
        total = (r.get("cold_start") or {}).get("total_s")
        out.append([f'<span title="{esc(r.get("note", ""))}">{esc(r["name"])}</span>', esc(r.get("runtime", "")),
                    esc(r.get("precision", ""))] + cells +
                   [esc(speedup_text(rows, r, target)), esc(serve_mix_text(r.get("serve_mix"))),
                    esc(fidelity_text(task, r.get("fidelity") or {})), esc(accuracy_text(r)), esc(ok),
                    "-" if total is None else f"{total:.2f}", f"{size / 2**20:.1f}" if size else "-",
                    rss_text(r)])
        cls = "chosen" if r["name"] == chosen else ("" if r.get("ok") else "rejected")
        attrs.append(f' data-variant="{esc(r["name"])}"' + (f' class="{cls}"' if cls else ""))
    html = table(head, out, attrs)
    errors = [r for r in rows if r.get("error")]
    if errors:
        html += "<p>Skipped variants:</p><ul>" + "".join(
            f"<li>{esc(r['name'])}: {esc(r['error'])}</li>" for r in errors) + "</ul>"
    return html


def recovery_html(recovery: dict[str, Any]) -> str:
    """report.md's recovery section: the steps tried when plain int8 missed the budget."""
    if not recovery.get("needed"):
        return f"<p>Recovery: not needed ({esc(recovery.get('why', '-'))}).</p>"
    out = [f"<p>Plain int8 missed the budget ({esc(recovery.get('why', ''))}); millis tried:</p>",
           table(["step", "variant", "within budget", "why", "detail"],
                 [[esc(a.get("step", "")), esc(a.get("variant", "")), "yes" if a.get("ok") else "no",
                   esc(a.get("reason", "")), esc(a.get("detail", ""))] for a in recovery.get("attempts", [])])]
    kept = recovery.get("kept_fp32")
    if kept:
        out.append(f"<p>Nodes kept in fp32 by <code>ort-int8-mixed</code> ({len(kept)} of "
                   f"{len(recovery.get('sensitivity', []))}; fp32 because ONNX Runtime's CPU MatMul has no bf16 "
                   f"kernel):</p>")
        out.append(table(["node", "output error when quantized alone", "why"],
                         [[f"<code>{esc(k['node'])}</code>", f"{k['error']:.3e}", esc(k.get("why", ""))]
                          for k in kept]))
    elif "sensitivity" in recovery:
        out.append("<p>The sensitivity fallback found no node set within budget below all-fp32.</p>")
    return "".join(out)


def trust_html(load: dict[str, Any] | None) -> str:
    """How busy the machine was while millis measured, and the warnings that make a timing suspect."""
    if not load:
        return "<p>Not recorded (an artifact from a millis that did not watch the machine's load).</p>"
    out = [f"<p>While measuring, other processes used {100 * load.get('other_share', 0):.0f}% of the CPUs, the "
           f"hypervisor stole {100 * load.get('steal_share', 0):.0f}%, and the widest round spread was "
           f"{100 * load.get('max_spread', 0):.0f}%.</p>"]
    out += [f'<p class="warn"><strong>Warning:</strong> {esc(w)}.</p>' for w in load.get("warnings") or []]
    if not load.get("warnings"):
        out.append("<p>No warnings: the timings were taken on a quiet machine.</p>")
    return "".join(out)


def machine_html(hw: dict[str, Any], meta: dict[str, Any]) -> str:
    facts = [("CPU", hw.get("cpu", "-")), ("cores", hw.get("cores", "-")),
             ("ISA", " ".join(hw.get("isa") or []) or "-"),
             ("machine", hw.get("machine", "-")), ("python", hw.get("python", "-")),
             ("millis", meta.get("millis_version", "-"))]
    facts += sorted((hw.get("versions") or {}).items())
    return table(["", "version / value"], [[esc(k), esc(v)] for k, v in facts])


def header_html(rep: dict[str, Any], meta: dict[str, Any], budget: dict[str, Any]) -> str:
    m, src, hw = rep.get("measured") or {}, rep.get("source") or {}, rep.get("hardware") or {}
    if m.get("accuracy"):
        drop = f"{budget['max_drop']} accuracy points" if "max_drop" in budget else "the accuracy budget"
        gate = f"within {drop} of fp32 on {m.get('selection_data') or (meta.get('config') or {}).get('data', '')}"
    else:
        gate = "within the fidelity budget"
    built = f" Built {meta['created']}." if meta.get("created") else ""
    warned = "".join(f'<p class="warn"><strong>Warning: {esc(w)}.</strong></p>'
                     for w in warnings_of(rep["variants"], rep.get("chosen", ""), budget.get("max_drop")))
    return (f"<h1>millis report: {esc(src.get('spec', '?'))} ({esc(rep.get('task', '?'))})</h1>{warned}"
            f"<p>Chosen: <strong>{esc(rep.get('chosen', '-'))}</strong> (fastest at {esc(m.get('target', '-'))} "
            f"{esc(gate)}, not stalling on new shapes; p50s within {100 * NEAR_TIE:.0f}% of the fastest tie, and "
            f"a tie goes to the most serve-mix rows/s).{esc(built)}</p>"
            f"<p>Machine: {esc(hw.get('cpu', '-'))}, {esc(hw.get('cores', '-'))} cores, ISA "
            f"{esc(' '.join(hw.get('isa') or []) or '-')}; millis {esc(meta.get('millis_version', '-'))}.</p>")


def table_notes(rep: dict[str, Any], meta: dict[str, Any]) -> str:
    """report.md's notes on the variant table (millis.optimize.report.notes), a paragraph each."""
    m = rep.get("measured") or {}
    data = m.get("selection_data") or (meta.get("config") or {}).get("data", "")
    return "".join(f"<p>{esc(n)}</p>" for n in notes(rep["variants"], m.get("target", "-"), m.get("fidelity_texts", ""),
                                                      data))


def render_html(rep: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
    """The whole page from report.json's dict and (optionally) millis.json's."""
    meta = meta or {}
    budget = (meta.get("config") or {}).get("budget") or {}
    m = rep.get("measured") or {}
    shapes = shapes_of(rep["variants"])
    title = f"millis report: {(rep.get('source') or {}).get('spec', '?')} ({rep.get('task', '?')})"
    parts = [header_html(rep, meta, budget),
             "<h2>Measurement trust</h2>", trust_html(m.get("load")),
             "<h2>Variants</h2>", table_notes(rep, meta), variant_table(rep),
             "<h2>Speed against quality</h2>", pareto_chart(rep, budget),
             "<h2>Latency distribution per shape</h2>"] + [cdf_chart(rep, s) for s in shapes] + \
            ["<h2>Recovery</h2>", recovery_html(rep.get("recovery") or {}),
             "<h2>Machine</h2>", machine_html(rep.get("hardware") or {}, meta)]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_html_report(artifact_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html for the artifact at `artifact_dir` (default: beside its report.json); its path."""
    artifact_dir = Path(artifact_dir)
    rep = load_report(artifact_dir)
    try:
        page = render_html(rep, read_json(artifact_dir / "millis.json"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MillisError(f"{artifact_dir / REPORT} is not a report this millis can render "
                          f"({type(e).__name__}: {e})") from None
    path = Path(out) if out else artifact_dir / HTML
    if path.is_dir():
        raise MillisError(f"--out {path}: is a directory; name the HTML file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, page)  # not through a symlink planted at report.html
    except OSError as e:
        raise MillisError(f"cannot write {path}: {e.strerror or e}") from None
    return path

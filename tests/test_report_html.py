"""report.html (millis.optimize.report_html, `millis report`): one self-contained page from report.json.

A synthetic report.json with the keys the pipeline writes checks the content, the charts and the escaping;
the session's real tiny-BERT artifact checks that `millis optimize` writes the page and that its table
says exactly what report.md says."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from millis.cli.main import main
from millis.common.errors import MillisError
from millis.optimize.report_html import write_html_report

EVIL = "<script>alert('x')</script>"
SHAPES = ("b1xs16", "b4xs64")


def stats(p50: float) -> dict:
    return {"p50_ms": p50, "p95_ms": 1.2 * p50, "p99_ms": 1.5 * p50, "mean_ms": 1.05 * p50, "n": 40,
            "rows_per_s": 1000 / p50, "round_p50_ms": [p50 * 0.98, p50 * 1.02], "spread": 0.04}


def variant(name: str, p50: float | None, acc: float, ok: bool = True, error: str = "") -> dict:
    """One row as VariantResult.__dict__ writes it; p50 None: a variant that failed to build (no timings)."""
    latency = {} if p50 is None else {s: stats(p50 * (1 + i)) for i, s in enumerate(SHAPES)}
    return {"name": name, "runtime": "onnxruntime", "precision": "int8", "note": f"note of {name}",
            "recipe": {"runtime": "onnxruntime", "passes": [], "options": {}},
            "facts": {"file": "model.onnx", "bytes": 3 * 2**20},
            "fidelity": {} if p50 is None else {"max_abs_diff": 0.01, "max_logit_diff": 0.01, "top1_agreement": 1.0},
            "accuracy": {} if p50 is None else {"accuracy": acc, "macro_f1": acc, "n": 40,
                                                "drop_pts": round(100 * (0.9 - acc), 6)},  # points below fp32
            "ok": ok, "reason": "within budget" if ok else "accuracy drop too big", "recovery": "",
            "cold_start": {} if p50 is None else {"load_s": 0.1, "first_call_s": 0.01, "total_s": 0.11},
            "rss_mb": 12.0, "latency": latency, "serve_mix": {}, "error": error}


def synthetic(root: Path) -> Path:
    """An artifact directory holding a report.json (and the millis.json the budget comes from)."""
    rows = [variant("torch-fp32", 10.0, 0.90), variant("ort-int8-dynamic", 2.0, 0.89),
            variant(EVIL, 1.0, 0.70, ok=False), variant("ov-int8", None, 0.0, ok=False, error="openvino & <missing>")]
    rep = {"chosen": "ort-int8-dynamic", "task": "classify",
           "source": {"spec": "tiny:bert", "path": "/x", "sha256": "0" * 64, "model_type": "bert", "layers": 2,
                      "hidden": 32, "heads": 4, "pooling": {"mode": "mean", "normalize": True}},
           "hardware": {"cpu": "Test CPU <9000>", "cores": 2, "isa": ["avx2", "avx512_vnni"], "machine": "x86_64",
                        "python": "3.11.7", "versions": {"onnxruntime": "1.99.0", "torch": "9.9"}},
           "measured": {"target": SHAPES[0], "latency": rows[1]["latency"], "fidelity": rows[1]["fidelity"],
                        "cold_start": rows[1]["cold_start"], "accuracy": rows[1]["accuracy"],
                        "reference_accuracy": 0.90, "fidelity_texts": "40 texts", "selection_data": "d.csv",
                        "load": {"other_share": 0.4, "steal_share": 0.0, "max_spread": 0.3,
                                 "warnings": ["other processes used 40% of the CPUs & more"]}},
           "variants": rows,
           "recovery": {"needed": True, "why": "ort-int8-dynamic: drop", "attempts": [
               {"step": "per-channel weights", "variant": "ort-int8-dynamic-pc", "ok": False, "reason": "drop 2 pt",
                "accuracy": 0.88, "fidelity": {}, "detail": ""}]}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").write_text(json.dumps(rep))
    (root / "millis.json").write_text(json.dumps({"millis_version": "0.1.0", "created": "2026-01-01T00:00:00",
                                                  "config": {"budget": {"max_drop": 0.5}}}))
    return root


class Page(HTMLParser):
    """The parts a test reads: table rows by variant (cell texts), and each chart's attributes and markers."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.row_class: dict[str, str] = {}
        self.charts: dict[str, dict] = {}
        self.row: str | None = None
        self.chart: str | None = None
        self.text: str | None = None
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "tr" and "data-variant" in a:
            self.row = a["data-variant"]
            self.rows[self.row], self.row_class[self.row] = [], a.get("class") or ""
        elif tag == "td" and self.row is not None:
            self.text = ""
        elif tag == "svg":
            self.chart = a["data-chart"]
            self.charts[self.chart] = {"points": int(a["data-points"]), "markers": []}
        elif self.chart and "point" in (a.get("class") or "").split():
            xs = [float(v) for v in re.findall(r"(-?[\d.]+),", a["points"])] if tag == "polygon" else [float(a["cx"])]
            self.charts[self.chart]["markers"].append((a.get("data-name"), sum(xs) / len(xs)))

    def handle_endtag(self, tag):
        if tag == "td" and self.text is not None:
            self.rows[self.row].append(self.text.strip())
            self.text = None
        elif tag == "tr":
            self.row = None
        elif tag == "svg":
            self.chart = None

    def handle_data(self, data):
        if self.text is not None:
            self.text += data


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    return p


def test_page_holds_the_table_charts_recovery_trust_and_machine(tmp_path):
    art = synthetic(tmp_path / "a")
    out = write_html_report(art)
    assert out == art / "report.html"
    rep, html = json.loads((art / "report.json").read_text()), out.read_text()
    page = parse(html)
    assert list(page.rows) == [r["name"] for r in rep["variants"]]  # one row per variant, in order
    assert page.row_class["ort-int8-dynamic"] == "chosen" and page.row_class[EVIL] == "rejected"
    fast = page.rows["ort-int8-dynamic"]
    assert fast[:5] == ["ort-int8-dynamic", "onnxruntime", "int8", "2.00 / 3.00", "4.00 / 6.00"]
    assert fast[5] == "5.00x [5.00-5.00]"  # round p50s 10 vs 2, pair by pair
    assert "89.00% (-1.00 pt)" in fast and "3.0" in fast and page.rows["ov-int8"][3:5] == ["-", "-"]
    timed = [r for r in rep["variants"] if SHAPES[0] in r["latency"]]
    pareto = page.charts["pareto"]
    assert pareto["points"] == len(timed) == len(pareto["markers"]) == 3
    # x is p50 on a log axis: the markers' left-to-right order is the p50 order
    by_x = [n for n, _ in sorted(pareto["markers"], key=lambda m: m[1])]
    assert by_x == [r["name"] for r in sorted(timed, key=lambda r: r["latency"][SHAPES[0]]["p50_ms"])]
    assert 'class="point chosen" data-name="ort-int8-dynamic"' in html  # the chosen one is the star
    for s in SHAPES:
        cdf = page.charts[f"cdf-{s}"]
        assert cdf["points"] == len(cdf["markers"]) == 3 * len(timed)  # p50, p95, p99 per variant
    assert "p50, p95 and p99" in html  # the caption says the CDF comes from stored percentiles
    assert "per-channel weights" in html and "ort-int8-dynamic-pc" in html and "drop 2 pt" in html
    assert "Warning:</strong> other processes used 40% of the CPUs &amp; more" in html
    assert "Test CPU &lt;9000&gt;" in html and "avx2 avx512_vnni" in html and "1.99.0" in html
    assert "openvino &amp; &lt;missing&gt;" in html  # the skipped variant's error
    assert "within 0.5 accuracy points" in html  # the budget, from millis.json


def test_page_is_self_contained_and_escapes_artifact_strings(tmp_path):
    html = write_html_report(synthetic(tmp_path / "a")).read_text()
    page = parse(html)
    assert not [r for r in page.refs if re.match(r"\s*(https?:)?//", r)] and not page.refs
    assert not re.search(r"<(script|link|img|iframe|object)\b", html, re.I)
    assert "@import" not in html and "url(" not in html and "http://" not in html and "https://" not in html
    assert EVIL not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert EVIL in page.rows  # escaped, it reads back as the name


def test_missing_or_bad_report_json_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(MillisError, match=re.escape(str(tmp_path / "report.json")) + " not found"):
        write_html_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(MillisError, match="not a millis report.json"):
        write_html_report(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope" / "report.json") in capsys.readouterr().err


def test_cli_report_writes_where_out_says(tmp_path, capsys):
    art = synthetic(tmp_path / "a")
    target = tmp_path / "pages" / "r.html"
    assert main(["report", str(art), "--out", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert target.is_file() and not (art / "report.html").exists()
    assert target.read_text() == write_html_report(art, tmp_path / "again.html").read_text()  # deterministic


def test_cli_report_never_writes_over_an_artifacts_own_files(tmp_path, classify_artifact, capsys):
    import shutil

    from millis.artifact.store import read_meta

    art = tmp_path / "art"
    shutil.copytree(classify_artifact, art)
    for inside in (art / "model.onnx", art / "charts.html", art / "tokenizer" / "report.html"):
        assert main(["report", str(art), "--out", str(inside)]) == 2
        assert f"inside {art}" in capsys.readouterr().err
    read_meta(art)  # still whole: model.onnx was overwritten before, and charts.html made it "corrupted"
    assert main(["report", str(art), "--out", str(art / "report.html")]) == 0  # the page's own place
    read_meta(art)
    (art / "sub").mkdir()
    (art / "sub" / "report.html").write_text("x")  # only the top-level report.html goes unhashed
    with pytest.raises(MillisError, match=r"does not list sub/report.html"):
        read_meta(art)


def md_rows(md: str) -> dict[str, list[str]]:
    """report.md's variant table: name -> its cells (bold marks dropped)."""
    out = {}
    for line in md.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 10 and cells[0] not in ("variant",) and "---" not in line:
            out[cells[0]] = cells
    return out


def test_optimize_writes_the_page_and_it_matches_report_md(classify_artifact):
    from millis.artifact.store import read_meta

    html = (classify_artifact / "report.html").read_text()  # written by `millis optimize`
    rep = json.loads((classify_artifact / "report.json").read_text())
    page, md = parse(html), md_rows((classify_artifact / "report.md").read_text())
    assert page.rows == md  # every cell of every row says what report.md says
    target = rep["measured"]["target"]
    assert page.charts["pareto"]["points"] == sum(target in r["latency"] for r in rep["variants"]) >= 2
    assert page.row_class[rep["chosen"]] == "chosen"
    write_html_report(classify_artifact)  # a view, not hashed: rewriting it leaves the artifact valid
    read_meta(classify_artifact, verify=True)


def test_non_finite_values_are_listed_not_plotted(tmp_path):
    """A NaN accuracy or an infinite p50 (a diverged variant) would write cx="nan": such a point is left out of
    the Pareto chart and named in its "Not plotted" note; the budget line from a NaN reference is not drawn."""
    art = synthetic(tmp_path / "a")
    rep = json.loads((art / "report.json").read_text())
    rows = {r["name"]: r for r in rep["variants"]}
    rows[EVIL]["accuracy"]["accuracy"] = float("nan")
    rows["torch-fp32"]["latency"][SHAPES[0]]["p50_ms"] = float("inf")
    (art / "report.json").write_text(json.dumps(rep))  # json writes NaN / Infinity, and reads them back
    html = write_html_report(art).read_text()
    pareto = parse(html).charts["pareto"]
    assert pareto["points"] == len(pareto["markers"]) == 1 and pareto["markers"][0][0] == "ort-int8-dynamic"
    svg_part = html[html.index('data-chart="pareto"'):html.index("</svg>", html.index('data-chart="pareto"'))]
    assert not re.search(r'="[^"]*\b(nan|inf)', svg_part, re.I), svg_part
    note = re.search(r"Not plotted \(p50 or accuracy on the labelled data not a finite number\): ([^.]*)\.", html)
    assert note and note.group(1) == "torch-fp32, &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    rep["measured"]["reference_accuracy"] = float("nan")
    (art / "report.json").write_text(json.dumps(rep))
    html = write_html_report(art).read_text()
    svg_part = html[html.index('data-chart="pareto"'):html.index("</svg>", html.index('data-chart="pareto"'))]
    assert not re.search(r'="[^"]*\b(nan|inf)', svg_part, re.I) and ">budget<" not in svg_part

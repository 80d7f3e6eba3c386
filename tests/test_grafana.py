"""deploy/grafana/millis.json: valid Grafana structure, and every metric a panel queries is one the servers
export (millis.serve.metrics), so a renamed metric fails here rather than as an empty panel."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from millis.serve.metrics import GenMetrics, Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "millis.json"
METRIC = re.compile(r"\bmillis_[a-z_]+\b")
# the series Prometheus stores per metric type, as prometheus_client exposes them (no *_created: disabled)
SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
          "summary": ("", "_sum", "_count"), "info": ("_info",)}


def series_names(metrics: Metrics) -> set[str]:
    """Every series name `metrics` can export: each family's per-type series (a labelled metric has no
    samples until a label set is used), plus the sample names collect() gives now."""
    out: set[str] = set()
    for family in metrics.registry.collect():
        out |= {family.name + suffix for suffix in SERIES[family.type]}
        out |= {s.name for s in family.samples}
    return out


def unknown_metrics(expr: str, exported: set[str]) -> set[str]:
    """The millis_* series an expression names that are not exported. Names are matched as whole series:
    `millis_requests` (a counter without _total) or `millis_ready_bucket` (a gauge has no buckets) are
    unknown, as they would be empty in Prometheus."""
    return set(METRIC.findall(expr)) - exported


def balanced(expr: str) -> bool:
    """Brackets nest and close outside quoted strings (no PromQL parser here; this catches a dropped one)."""
    stack, quoted, pairs = [], False, {")": "(", "]": "[", "}": "{"}
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not quoted


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_with_rows(dash: dict) -> list[tuple[str, dict]]:
    """(title of the row above, panel) for every panel, nested collapsed-row panels included."""
    out, row = [], ""
    for p in dash["panels"]:
        if p["type"] == "row":
            row = p["title"]
            out += [(row, q) for q in p.get("panels", [])]
        out.append((row, p))
    return out


def test_exported_names_match_what_the_registry_renders():
    m = GenMetrics()
    m.requests.labels("/v1/embeddings", "200").inc()
    m.duration.labels("/v1/embeddings", "2xx").observe(0.01)
    rendered = {line.split("{")[0].split(" ")[0] for line in m.render()[0].decode().splitlines()
                if line and not line.startswith("#")}
    assert rendered and rendered <= series_names(m)
    assert {"millis_requests_total", "millis_request_duration_seconds_bucket", "millis_ready",
            "millis_time_to_first_token_seconds_count"} <= series_names(m)
    assert "millis_time_to_first_token_seconds_bucket" not in series_names(Metrics())  # encoder servers lack it


def test_unknown_metric_names_are_caught():
    exported = series_names(GenMetrics())
    assert unknown_metrics('rate(millis_requests_total{job=~"$job"}[5m])', exported) == set()
    assert unknown_metrics("rate(millis_requests_count[5m]) + millis_no_such_metric", exported) == {
        "millis_requests_count", "millis_no_such_metric"}
    assert unknown_metrics("histogram_quantile(0.5, rate(millis_ready_bucket[5m]))", exported) == {
        "millis_ready_bucket"}
    assert unknown_metrics("millis_requests", exported) == {"millis_requests"}  # a counter's series ends _total
    assert balanced('sum(rate(millis_ready{job=~"(a|b)"}[5m]))') and not balanced("sum(rate(millis_ready[5m])")


def test_dashboard_structure():
    dash = load()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["title"] and dash["uid"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["type"] == "datasource" and dash["__inputs"][0]["pluginId"] == "prometheus"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"job", "instance"} <= names
    panels = [p for _, p in panels_with_rows(dash)]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert isinstance(t["expr"], str) and METRIC.search(t["expr"]) and balanced(t["expr"]), (p["title"], t)
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"


@pytest.mark.parametrize("server", ["encoder", "generation"])
def test_every_queried_metric_is_exported(server):
    """Panels outside the Generation row must work against an encoder server (Metrics); all against GenMetrics."""
    exported = series_names(GenMetrics() if server == "generation" else Metrics())
    checked = 0
    for row, p in panels_with_rows(load()):
        if p["type"] == "row" or (server == "encoder" and row == "Generation"):
            continue
        for t in p["targets"]:
            assert unknown_metrics(t["expr"], exported) == set(), (p["title"], t["expr"])
            checked += 1
    assert checked >= (15 if server == "encoder" else 25)


def test_dashboard_covers_the_metrics_asked_for():
    used = {n for _, p in panels_with_rows(load()) for t in p.get("targets", []) for n in METRIC.findall(t["expr"])}
    assert {"millis_request_duration_seconds_bucket", "millis_requests_total", "millis_queue_depth",
            "millis_inflight_requests", "millis_batch_size_bucket", "millis_queue_seconds_bucket",
            "millis_tokenize_seconds_bucket", "millis_inference_seconds_bucket", "millis_cold_start_seconds",
            "millis_ready", "millis_time_to_first_token_seconds_bucket", "millis_inter_token_latency_seconds_bucket",
            "millis_generated_tokens_total", "millis_running_requests", "millis_prefix_cache_hit_ratio",
            "millis_speculative_acceptance_ratio", "millis_generation_requests_total"} <= used


def _samples(m: Metrics) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m.render()[0].decode()) for s in fam.samples}


def test_latency_by_status_class_long_generations_and_per_token_itl():
    """The request duration splits served answers from shed / failed ones (a 429 in 0.1 ms is not the served
    latency); a generation's duration has buckets past 30 s (histogram_quantile read every longer one as 30 s);
    tokens a speculative step delivers together are one inter-token latency each, at their share of the time;
    the prefix cache's hit tokens and the preemptions are counters (totals since start)."""
    from types import SimpleNamespace

    m = GenMetrics()
    m.on_request("/v1/completions", 200, 400.0)
    m.on_request("/v1/completions", 429, 0.0001)
    got = _samples(m)
    route = ("route", "/v1/completions")
    assert got[("millis_request_duration_seconds_count", (route, ("status_class", "2xx")))] == 1
    assert got[("millis_request_duration_seconds_count", (route, ("status_class", "429")))] == 1
    assert got[("millis_request_duration_seconds_bucket", (("le", "300.0"), route, ("status_class", "2xx")))] == 0
    assert got[("millis_request_duration_seconds_bucket", (("le", "600.0"), route, ("status_class", "2xx")))] == 1
    m.on_itl(0.03, 3)
    got = _samples(m)
    assert got[("millis_inter_token_latency_seconds_count", ())] == 3
    assert got[("millis_inter_token_latency_seconds_sum", ())] == pytest.approx(0.03)
    assert got[("millis_inter_token_latency_seconds_bucket", (("le", "0.01"),))] == 3
    eng = SimpleNamespace(max_batch=2, free_slots=2, waiting=[], preempted=2, draft_stats=SimpleNamespace(drafted=0),
                          drafter=None, kv=SimpleNamespace(hit_tokens=40, hit_rate=0.5))
    m.observe_engine(eng)
    eng.kv.hit_tokens, eng.preempted, eng.drafter = 70, 3, SimpleNamespace(failures=2)
    m.observe_engine(eng)
    eng.drafter.failures = 5
    m.observe_engine(eng)
    m.observe_engine(eng)
    got = _samples(m)
    assert got[("millis_prefix_cache_hit_tokens_total", ())] == 70 and got[("millis_preempted_requests_total", ())] == 3
    assert got[("millis_draft_model_failures_total", ())] == 5
    assert Metrics().duration.bounds[-1] == 30.0  # an encoder's stop at 30 s

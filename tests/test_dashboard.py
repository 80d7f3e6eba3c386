"""/stats and /dashboard: the per-second window (millis.serve.live) against known observations on a
fake clock, then both routes on a real encoder and a real generation server."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from millis.serve.dashboard import page, parse_window
from millis.serve.live import RESOLUTION, SECONDS, Live, bucket, status_class
from millis.serve.schemas import ApiError
from test_serve import Server, embed_artifact  # noqa: F401 -- embed_artifact is a fixture
from test_serve_gen import build_llama

CHARTS = ("latency", "requests", "queue_depth", "batch_rows", "stages")
GEN_CHARTS = ("ttft", "itl", "tokens", "slots", "kv", "prefix")


class Clock:
    def __init__(self, t: float = 10_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def nearest_rank_ms(x, q: float) -> float:
    return float(np.sort(x)[math.ceil(q * len(x)) - 1]) * 1e3


def close(got: float, want: float) -> bool:
    """Within one bucket of the histogram (the middle of a bucket is within half a bucket of its values)."""
    return want / RESOLUTION <= got <= want * RESOLUTION


# ---- the window, on a fake clock -------------------------------------------------------------

def test_percentiles_of_the_last_minute_are_within_a_bucket():
    clock, rng = Clock(), np.random.default_rng(0)
    live = Live(clock=clock)
    old = rng.lognormal(math.log(2.0), 0.3, 500)               # seconds: slow, then out of the minute
    for i, d in enumerate(old):
        clock.t = 10_000 + i * 10 / len(old)
        live.request("/v1/embeddings", 200, d)
    new = rng.lognormal(math.log(0.004), 1.2, 3000)            # 4 ms median, a long tail
    for i, d in enumerate(new):
        clock.t = 10_100 + i * 59 / len(new)
        live.request("/v1/embeddings", 200, d)
    live.request("/v1/models", 200, 30.0)                       # counted, not timed: not a model route
    s = live.snapshot(600)
    lat = s["summary"]["latency_ms"]
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert close(lat[name], nearest_rank_ms(new, q)), (name, lat[name], nearest_rank_ms(new, q))
    assert s["summary"]["latency_samples"] == len(new) and s["summary"]["requests"] == len(new) + 1
    # each second of the series has its own percentiles; the old ones are still in the 10 minutes
    times = (10_100 + np.arange(len(new)) * 59 / len(new), 10_000 + np.arange(len(old)) * 10 / len(old))
    for x, t in zip((new, old), times):
        sec = np.floor(t).astype(int)
        one = int(sec[len(sec) // 2])
        k = s["series"]["t"].index(one - int(clock.t))
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            assert close(s["series"]["latency_ms"][name][k], nearest_rank_ms(x[sec == one], q))
    assert sum(s["series"]["requests"]) == len(old) + len(new) + 1


def test_buckets_cover_their_values():
    for x in np.geomspace(2e-5, 100, 500):
        i = bucket(float(x))
        assert 1e-5 * RESOLUTION ** i <= x * (1 + 1e-9) and x < 1e-5 * RESOLUTION ** (i + 1) * (1 + 1e-9)
    assert bucket(0.0) == 0 and bucket(1e9) == bucket(1e10)


def test_status_classes_and_counts():
    assert [status_class(c) for c in (200, 201, 400, 404, 413, 422, 499, 429, 503, 500, 504)] == \
        [0, 0, 1, 1, 1, 1, 1, 2, 3, 4, 4]
    clock = Clock(1000.0)
    live = Live(clock=clock)
    clock.t = 1200.0
    for code, n in ((200, 7), (422, 3), (429, 2), (503, 1), (500, 1)):
        for _ in range(n):  # the shed and failed answers quick: they must not pull the latency down
            live.request("/v1/classify", code, 0.01 if code == 200 else 0.0001)
    clock.t = 1200.25
    s = live.snapshot(60)["summary"]
    assert s["status"] == {"2xx": 7, "4xx": 3, "429": 2, "503": 1, "5xx": 1} and s["shedding"] == 3
    # a rate over the time the minute covers: 59 s and the current second's quarter
    assert s["requests"] == 14 and s["requests_per_s"] == round(14 / 59.25, 3)
    assert s["latency_samples"] == 7 and s["latency_ms"]["p50"] == pytest.approx(10, rel=RESOLUTION - 1)
    live.request("/embed", 200, 0.01)  # TEI's routes are model routes
    assert live.snapshot(60)["summary"]["latency_samples"] == 8
    early = Live(clock=Clock(50.0))  # 3 answers in the first 2 s: per second over those 2 s, not over a minute
    early.clock.t = 52.0
    for _ in range(3):
        early.request("/v1/classify", 200, 0.01)
    assert early.snapshot(60)["summary"]["requests_per_s"] == 1.5


def test_rollover_after_more_than_ten_minutes_of_fake_time():
    clock = Clock(5_000.0)
    live = Live(clock=clock)
    for i in range(700):                                        # one answer a second for 700 s
        clock.t = 5_000 + i + 0.5
        live.request("/v1/embeddings", 200 if i % 2 else 429, 0.001 * (1 + i % 7))
    s = live.snapshot(600)
    assert len(s["series"]["requests"]) == 600 and s["series"]["requests"] == [1] * 600
    assert s["series"]["t"][0] == -599 and s["series"]["t"][-1] == 0
    assert s["summary"]["requests"] == 60 and s["summary"]["status"]["429"] == 30
    live.snapshot(600)                                          # the ended seconds are kept
    clock.t += 1_000                                            # idle for longer than the ring
    s = live.snapshot(600)
    assert sum(s["series"]["requests"]) == 0 and s["summary"]["latency_ms"]["p99"] is None
    assert all(p is None for p in s["series"]["latency_ms"]["p99"])
    live.request("/v1/embeddings", 200, 0.002)                  # the writer clears every stale row
    s = live.snapshot(600)
    assert s["series"]["requests"] == [0] * 599 + [1] and s["summary"]["latency_samples"] == 1
    assert close(s["summary"]["latency_ms"]["p50"], 2.0)
    assert len(live.req.v) == SECONDS                           # bounded


def test_the_current_second_is_read_again_and_ended_ones_are_kept():
    clock = Clock(100.2)
    live = Live(clock=clock)
    live.request("/v1/embeddings", 200, 0.001)
    assert live.snapshot(5)["series"]["latency_ms"]["p99"][-1] == pytest.approx(1.0, rel=RESOLUTION - 1)
    live.request("/v1/embeddings", 200, 0.1)                    # same second, after a read
    assert live.snapshot(5)["series"]["latency_ms"]["p99"][-1] == pytest.approx(100, rel=RESOLUTION - 1)
    clock.t = 101.5
    s = live.snapshot(5)
    assert s["series"]["latency_ms"]["p99"][-2:] == [pytest.approx(100, rel=RESOLUTION - 1), None]
    assert s["series"]["requests"][-2:] == [2, 0]


def test_stages_batches_and_generation_series():
    clock = Clock(50.0)
    live = Live(generation=True, clock=clock)
    kv = SimpleNamespace(in_use=12, prompt_tokens=100, hit_tokens=25)
    live.stages(0.002, 0.001, 0.010)
    live.stages(0.004, 0.003, 0.030)
    live.batch(4, 64, 0.02)
    live.batch(8, 128, 0.04)
    live.queue_depth(3)
    live.engine(running=2, waiting=5, kv=kv)
    kv.in_use, kv.prompt_tokens, kv.hit_tokens = 30, 200, 80
    live.engine(running=1, waiting=0, kv=kv)                    # same second: the KV is sampled once
    live.ttft(0.05)
    for d in (0.010, 0.011, 0.012, 0.030):
        live.itl(d)
    live.tokens(5)
    clock.t = 51.0
    live.engine(running=1, waiting=0, kv=kv)                    # next second: the rest of the hits
    s = live.snapshot(2)
    sm, se = s["summary"], s["series"]
    assert (sm["queue_ms"], sm["tokenize_ms"], sm["inference_ms"]) == (3.0, 2.0, 20.0)
    assert sm["batch_rows"] == 6.0 and sm["batch_ms"] == 30.0 and se["batch_rows_max"] == [8, 0]
    assert se["queue_depth"] == [5, 0] and se["running"] == [2, 1] and se["waiting"] == [5, 0]
    assert se["kv_blocks_used"] == [12, 30] and se["tokens_per_s"] == [5, 0] and sm["tokens"] == 5
    assert se["prefix_hit_rate"] == [0.25, 0.55] and sm["prefix_hit_rate"] == 0.4
    assert close(sm["ttft_ms"]["p50"], 50) and close(sm["itl_ms"]["p50"], 11) and close(sm["itl_ms"]["p99"], 30)
    assert "ttft_ms" not in Live(clock=clock).snapshot(60)["series"]  # an encoder server has none


@pytest.mark.parametrize("values", [["abc"], ["0"], ["601"], [""], ["-5"], ["1.5"], ["60", "60"], ["1e2"]])
def test_a_bad_window_is_a_400_naming_it(values):
    with pytest.raises(ApiError) as e:
        parse_window(values)
    assert e.value.status == 400 and e.value.param == "window" and "window" in e.value.message


def test_window_values():
    assert parse_window([]) == 60 and parse_window(["1"]) == 1 and parse_window(["600"]) == 600


def test_the_page_is_self_contained_and_its_script_parses(tmp_path):
    html = page().decode()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert not re.search(r"<script[^>]*\bsrc=|<link\b[^>]*href=\"(?!data:)|@import|url\(", html, re.I)
    for name in ("latency", "requests", "queue_depth", "batch_rows", "stages", *GEN_CHARTS):
        assert f'["{name}",' in html, name
    assert "p99 over the last minute" in html and "no requests yet" in html and "shedding load" in html
    if shutil.which("node"):
        script = html[html.index("<script>") + 8:html.index("</script>")]
        (tmp_path / "page.js").write_text(script)
        r = subprocess.run(["node", "--check", str(tmp_path / "page.js")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# ---- real servers ------------------------------------------------------------------------------

def stats(s: Server, window: int = 60) -> dict:
    status, body = s.get(f"/stats?window={window}")
    assert status == 200, body
    return json.loads(body)


def browser_dom(s: Server) -> str | None:
    """The page's DOM after a few seconds of polling in headless Chromium (None without one)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        return None
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2500",
                        "--dump-dom", f"{s.url}/dashboard"], capture_output=True, text=True, timeout=60)
    return r.stdout if r.returncode == 0 and "<body" in r.stdout else None


def page_ok(dom: str) -> bool:
    """The page rendered a /stats answer and counted no script error (both on its <body>)."""
    body = re.search(r"<body([^>]*)>", dom)[1]
    return "data-js-errors" not in body and "data-renders=" in body


def chart_points(dom: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r'data-chart="(\w+)" data-points="(\d+)"', dom)}


def test_encoder_server_stats_and_dashboard(embed_artifact):  # noqa: F811
    s = Server(embed_artifact, "--model-name", "tiny-embed")
    try:
        idle = stats(s)
        assert idle["summary"]["requests"] == 0 and idle["summary"]["latency_ms"]["p99"] is None
        assert idle["model"]["status"] == "ready" and idle["model"]["cold_start_s"] > 0
        assert idle["model"]["task"] == "embed" and idle["model"]["max_length"] > 0
        dom = browser_dom(s)
        if dom is not None:  # an idle server: every chart says so, and no script error
            assert page_ok(dom), dom[:3000]
            assert set(chart_points(dom)) >= set(CHARTS) and not any(chart_points(dom).values())
            assert "no requests yet" in dom
        for _ in range(5):
            assert s.post("/v1/embeddings", {"input": ["card", "a longer text here"]})[0] == 200
        assert s.post("/v1/embeddings", {"input": []})[0] == 400
        assert s.post("/v1/embeddings", raw=b'{"input": ')[0] == 400
        assert s.post("/v1/nowhere", {})[0] == 404
        before = stats(s, 600)
        for path in ("/dashboard", "/stats", "/stats?window=0", "/metrics"):   # none of these is counted
            s.get(path)
        got = stats(s, 600)
        rates = ("requests_per_s", "batches_per_s")  # over the time the minute covers: it grew meanwhile
        assert {k: v for k, v in got["summary"].items() if k not in rates} == \
            {k: v for k, v in before["summary"].items() if k not in rates}
        sm = got["summary"]
        assert sm["status"] == {"2xx": 5, "4xx": 3, "429": 0, "503": 0, "5xx": 0} and sm["shedding"] == 0
        assert sm["latency_samples"] == 5                       # served answers: the 4xx are not timed
        assert sm["latency_ms"]["p50"] > 0 and sm["latency_ms"]["p99"] >= sm["latency_ms"]["p50"]
        assert sm["inference_ms"] > 0 and sm["batch_rows"] >= 1 and sum(got["series"]["batches"]) >= 5
        assert len(got["series"]["t"]) == 600 and got["gauges"]["queue_depth"] == 0
        status, h, body = s.request("GET", "/stats?window=601")
        assert status == 400 and json.loads(body)["error"]["param"] == "window"
        status, h, body = s.request("GET", "/dashboard")
        assert status == 200 and h["content-type"].startswith("text/html") and b"data-chart" in body
        paths = json.loads(s.get("/openapi.json")[1])["paths"]
        assert "/stats" in paths and "/dashboard" in paths
        dom = browser_dom(s)
        if dom is not None:
            pts = chart_points(dom)
            assert page_ok(dom) and pts["latency"] >= 1 and pts["requests"] >= 1, pts
            assert re.search(r"p99 over the last minute: [0-9.]+ ms", dom)
    finally:
        assert s.stop() == 0


def test_generation_server_stats(tmp_path):
    s = Server(build_llama(tmp_path / "llama", None), "--max-batch", "2", "--max-tokens", "16")
    try:
        for _ in range(2):
            status, _, body = s.post("/v1/completions", {"prompt": "the cat", "max_tokens": 8, "ignore_eos": True,
                                                         "temperature": 0})
            assert status == 200, body
        assert s.post("/v1/completions", {"prompt": "the cat", "max_tokens": -1})[0] == 400
        got = stats(s, 120)
        sm, se = got["summary"], got["series"]
        assert sm["status"]["2xx"] == 2 and sm["status"]["4xx"] == 1 and sm["tokens"] == 16
        assert sum(se["tokens_per_s"]) == 16 and sm["ttft_ms"]["p50"] > 0 and sm["itl_ms"]["p99"] > 0
        assert max(se["running"]) == 1 and got["gauges"]["running"] == 0 and got["gauges"]["slots"] == 2
        assert got["model"]["slots"] == 2 and got["model"]["task"] == "generate" and got["model"]["cold_start_s"] > 0
        dom = browser_dom(s)
        if dom is not None:
            pts = chart_points(dom)
            assert page_ok(dom) and 'id="gen" hidden' not in dom
            assert pts["ttft"] >= 1 and pts["tokens"] >= 1 and pts["latency"] >= 1, pts
    finally:
        assert s.stop() == 0


def test_stats_answers_close_together_share_one_snapshot(monkeypatch):
    """A snapshot of 600 s costs the event loop ~7 ms: /stats answers within SNAPSHOT_S of each other (many
    pages polling) share one per window; a later one, or another window, takes its own."""
    import asyncio

    from starlette.requests import Request

    import millis.serve.dashboard as dash

    clock = Clock(1000.0)
    live = Live(clock=clock)
    taken = []
    real = live.snapshot
    monkeypatch.setattr(live, "snapshot", lambda w: taken.append(w) or real(w))
    now = [500.0]
    monkeypatch.setattr(dash.time, "monotonic", lambda: now[0])
    st = SimpleNamespace(metrics=SimpleNamespace(live=live), name="m", cold_start_s=0.0, draining=False,
                         load_error=None)
    stats = dash.live_routes(st, dict, dict, lambda: True)[0].endpoint

    def get(window: int) -> dict:
        req = Request({"type": "http", "method": "GET", "query_string": f"window={window}".encode(), "headers": []})
        return json.loads(asyncio.run(stats(req)).body)

    live.request("/v1/classify", 200, 0.01)
    first = get(600)
    live.request("/v1/classify", 200, 0.01)
    assert get(600)["summary"]["requests"] == first["summary"]["requests"] == 1 and taken == [600]
    assert get(60)["summary"]["requests"] == 2 and taken == [600, 60]  # another window: its own
    now[0] += dash.SNAPSHOT_S + 0.01
    assert get(600)["summary"]["requests"] == 2 and taken == [600, 60, 600]
    assert first["model"]["status"] == "ready" and "gauges" in first

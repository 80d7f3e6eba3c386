"""The pages a person opens, in a real headless Chromium (tests/browser.py): the HTML report of a real
`millis optimize` run, and a live server's /dashboard under load. A test fails on any JavaScript error
or an empty chart, and keeps a screenshot (tests/.screenshots/ or $MILLIS_SCREENSHOTS).
Skipped, with the reason, where Chromium is absent (`make test` installs it where it can)."""
from __future__ import annotations

import pytest
from browser import Browser, screenshot_dir
from test_serve import Server, embed_artifact  # noqa: F401 -- embed_artifact is a fixture

OK, WHY = Browser.available()
pytestmark = pytest.mark.skipif(not OK, reason=WHY)

CHARTS = "Array.from(document.querySelectorAll('[data-chart]')).map(e => [e.dataset.chart, +e.dataset.points])"


def test_html_report_opens_with_every_chart_drawn(classify_artifact):
    html = classify_artifact / "report.html"  # written by `millis optimize`
    with Browser() as b:
        page = b.open(html.as_uri(), wait_s=0.3)
        charts = dict(page.evaluate(CHARTS))
        shot = page.screenshot(screenshot_dir() / "report.png", full_page=True)
        assert not page.errors, page.errors
    assert "pareto" in charts and any(k.startswith("cdf-") for k in charts), charts
    assert all(n > 0 for n in charts.values()), charts  # no empty chart
    assert shot.stat().st_size > 10_000


def test_dashboard_of_a_live_server_under_load_shows_p99_and_shedding(embed_artifact):  # noqa: F811
    """An encoder server with a tiny queue, driven by 8 client threads (some answered 429), its /dashboard
    open: the page draws the load live, its headline states the last minute's p99, and the shedding
    badge is up; no JavaScript error."""
    import threading

    s = Server(embed_artifact, "--max-queue", "4", "--max-inputs", "4", "--max-batch", "4")
    stop, codes = threading.Event(), []

    def client() -> None:
        while not stop.is_set():
            codes.append(s.post("/v1/embeddings", {"input": ["where is my card?", "a longer text " * 20] * 2})[0])

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    try:
        with Browser() as b:
            page = b.open(f"{s.url}/dashboard", wait_s=0.5)
            for t in threads:
                t.start()
            page.wait_for("+document.querySelector('[data-chart=latency]').dataset.points >= 2", timeout_s=30)
            page.wait_for("document.querySelector('#shedding').dataset.shed > 0", timeout_s=30)
            state = page.evaluate("({head: document.querySelector('#headline').textContent,"
                                  " p99: +document.querySelector('#headline').dataset.p99,"
                                  " shed: !document.querySelector('#shedding').hidden,"
                                  " renders: +document.body.dataset.renders})")
            charts = dict(page.evaluate(CHARTS))
            page.screenshot(screenshot_dir() / "dashboard-under-load.png", full_page=True)
            assert not page.errors, page.errors
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert s.stop() == 0
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert state["shed"] and state["p99"] > 0 and "p99 over the last minute" in state["head"], state
    assert state["renders"] >= 2
    assert all(charts[k] > 0 for k in ("latency", "requests", "batch_rows", "stages")), charts


def test_dashboard_says_unreachable_when_the_server_stops_answering(embed_artifact):  # noqa: F811
    """A server that accepts connections and never answers (stopped here with SIGSTOP: its kernel still queues
    them) must not leave the last numbers up under a green "ready": the page's poll gives up after 3 s and says
    unreachable, then recovers when the server answers again."""
    import os
    import signal

    s = Server(embed_artifact)
    status = "document.getElementById('status').textContent"
    try:
        with Browser() as b:
            page = b.open(f"{s.url}/dashboard", wait_s=0.5)
            page.wait_for(f"{status} === 'ready'", timeout_s=15)
            os.kill(s.pid, signal.SIGSTOP)
            try:
                page.wait_for(f"{status} === 'unreachable'", timeout_s=10)
                error = page.evaluate("document.getElementById('error').textContent")
            finally:
                os.kill(s.pid, signal.SIGCONT)
            page.wait_for(f"{status} === 'ready'", timeout_s=15)
            assert not page.errors, page.errors
    finally:
        os.kill(s.pid, signal.SIGCONT)
        assert s.stop() == 0
    assert "no answer in 3 s" in error, error

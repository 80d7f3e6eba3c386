"""The pages a person opens, in a real headless Chromium (tests/browser.py): the HTML report of a real
`millis optimize` run, and a live server's /dashboard under load. A test fails on any JavaScript error
or an empty chart, and keeps a screenshot (tests/.screenshots/ or $MILLIS_SCREENSHOTS).
Skipped, with the reason, where Chromium is absent (`make test` installs it where it can)."""
from __future__ import annotations

import pytest
from browser import Browser, screenshot_dir

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

"""Self-test of the headless-Chromium harness (tests/browser.py) on small static pages served locally."""
from __future__ import annotations

import functools
import http.server
import os
import struct
import threading
from pathlib import Path

import pytest

import browser
from browser import Browser, BrowserError, screenshot_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_POINTS = 7

# (a) the points appear only after a timer, as a live chart's would; a clean page: no errors expected
SVG_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>points</title></head><body>
<svg id="chart" width="400" height="200"></svg>
<script>
console.log("chart page up");
setTimeout(() => {
  const svg = document.getElementById("chart");
  for (let i = 0; i < %d; i++) {
    const c = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    c.setAttribute("cx", String(10 + 50 * i)); c.setAttribute("cy", "100"); c.setAttribute("r", "4");
    svg.appendChild(c);
  }
}, 300);
</script></body></html>""" % N_POINTS

# (b) one error of each kind the harness records
ERROR_PAGE = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<img src="missing.png">
<script>
console.error("bad thing happened");
setTimeout(() => { window.thrown = true; throw new Error("boom"); }, 100);
</script></body></html>"""

# (c) known colours at known places: red top-left block, blue block right of it, white elsewhere
PAINT_PAGE = """<!doctype html><html><head><style>
body { margin: 0; background: #ffffff; }
#red { position: absolute; left: 0; top: 0; width: 200px; height: 200px; background: #ff0000; }
#blue { position: absolute; left: 300px; top: 0; width: 200px; height: 200px; background: #0000ff; }
</style></head><body><div id="red"></div><div id="blue"></div></body></html>"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Base URL of a local HTTP server (a daemon thread) serving the three pages."""
    root = tmp_path_factory.mktemp("site")
    for name, html in (("svg.html", SVG_PAGE), ("errors.html", ERROR_PAGE), ("paint.html", PAINT_PAGE)):
        (root / name).write_text(html)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def chrome():
    ok, reason = Browser.available()
    if not ok:
        pytest.skip(reason)
    with Browser(width=1280, height=800) as b:
        yield b


def test_svg_points_after_timer(chrome, site):
    page = chrome.open(f"{site}/svg.html", timeout_s=20)
    assert page.wait_for("document.querySelectorAll('#chart circle').length > 0", timeout_s=10)
    assert page.evaluate("document.querySelectorAll('#chart circle').length") == N_POINTS
    xs = page.evaluate("[...document.querySelectorAll('#chart circle')].map(c => +c.getAttribute('cx'))")
    assert xs == [10 + 50 * i for i in range(N_POINTS)]
    assert page.evaluate("document.title") == "points"
    assert page.evaluate("Promise.resolve(6 * 7)") == 42  # promises are awaited
    assert "log: chart page up" in page.console
    assert page.errors == []  # a clean page reports nothing (no favicon noise either)


def test_errors_are_recorded(chrome, site):
    page = chrome.open(f"{site}/errors.html", wait_s=0.2)
    page.wait_for("window.thrown === true", timeout_s=10)
    page.pump(0.3)
    errors = page.errors
    assert any("boom" in e and e.startswith("exception:") for e in errors), errors
    assert any("bad thing happened" in e and e.startswith("console.error:") for e in errors), errors
    assert any("missing.png" in e and e.startswith("log") for e in errors), errors
    assert len(errors) == 3, errors


def test_evaluate_and_wait_for_fail_clearly(chrome, site):
    page = chrome.open(f"{site}/svg.html")
    with pytest.raises(BrowserError, match="nope"):
        page.evaluate("(() => { throw new Error('nope') })()")
    with pytest.raises(BrowserError, match="not true within"):
        page.wait_for("document.querySelector('#never') !== null", timeout_s=0.5)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_screenshot_png(chrome, site, tmp_path):
    page = chrome.open(f"{site}/paint.html")
    path = page.screenshot(tmp_path / "shots" / "paint.png")
    data = path.read_bytes()
    assert png_size(data) == (1280, 800)  # the window size the browser was started with
    assert len(data) > 1000
    pil = pytest.importorskip("PIL.Image")
    with pil.open(path) as im:
        rgb = im.convert("RGB")
        assert len(rgb.getcolors(maxcolors=1 << 16) or []) >= 3  # not a flat image
        assert rgb.getpixel((100, 100)) == (255, 0, 0)
        assert rgb.getpixel((400, 100)) == (0, 0, 255)
        assert rgb.getpixel((1000, 600)) == (255, 255, 255)


def live_processes_mentioning(text: str) -> list[str]:
    """Command lines of running (not zombie) processes whose command line contains `text` (Linux /proc)."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc to list processes")
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # not a process, or it ended meanwhile
        if text in cmd and state != "Z":
            found.append(cmd)
    return found


def test_browser_is_killed_and_profile_removed_on_failure():
    ok, reason = Browser.available()
    if not ok:
        pytest.skip(reason)
    b = Browser()
    with pytest.raises(ZeroDivisionError):
        with b:
            proc, profile = b.proc, b.profile
            assert proc is not None and proc.poll() is None and profile and os.path.isdir(profile)
            assert live_processes_mentioning(profile)  # the check below can see a running browser
            1 / 0
    assert proc.poll() is not None
    assert live_processes_mentioning(profile) == []  # helpers too (crashpad runs in a session of its own)
    assert not os.path.exists(profile)
    b.close()  # a second close is harmless


def test_skip_reason_without_chromium(monkeypatch):
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    ok, reason = Browser.available()
    assert not ok
    assert "chromium not found" in reason and "skipped" in reason and "apt-get install chromium" in reason
    with pytest.raises(BrowserError, match="chromium not found"):
        Browser().start()


def test_skip_reason_names_a_bad_explicit_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("MILLIS_CHROMIUM", str(tmp_path / "no-such-chromium"))
    ok, reason = Browser.available()
    assert not ok and "no-such-chromium" in reason


def test_screenshot_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MILLIS_SCREENSHOTS", str(tmp_path / "shots"))
    assert screenshot_dir() == tmp_path / "shots" and (tmp_path / "shots").is_dir()
    monkeypatch.delenv("MILLIS_SCREENSHOTS")
    assert screenshot_dir() == Path(browser.__file__).resolve().parent / ".screenshots"

"""A small headless-Chromium harness for browser tests, speaking the DevTools protocol (CDP) directly.

    ok, reason = Browser.available()          # tests: if not ok: pytest.skip(reason)
    with Browser() as b:
        page = b.open(url, wait_s=0.5)        # navigate, wait for the load event, then let timers run
        page.wait_for("document.querySelectorAll('circle').length >= 5", timeout_s=5)
        n = page.evaluate("document.querySelectorAll('circle').length")
        assert not page.errors                # uncaught exceptions, console.error, error log entries
        page.screenshot(screenshot_dir() / "dashboard.png")

Why raw CDP and not playwright: Debian's `chromium` plus the `websockets` package (its sync client) is all it
needs; playwright would add a large driver (a bundled node runtime) for the handful of calls used here.

One websocket to the browser carries every page: targets are attached with flatten=True, so each command
and event names its page by sessionId. Everything is synchronous: events are read (and recorded on their
page) whenever a command waits for its reply, or when `Page.pump` / `Page.errors` drains the socket.
Every wait has a deadline, and the browser's whole process group is killed and its temporary profile
removed on exit, even when a test fails or the browser hangs.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ENV_EXECUTABLE = "MILLIS_CHROMIUM"  # an explicit browser binary, overriding the PATH lookup
ENV_SCREENSHOTS = "MILLIS_SCREENSHOTS"  # where browser tests keep their screenshots
INSTALL_HINT = "install it with `apt-get install chromium` (or set MILLIS_CHROMIUM to a Chromium binary)"
WS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


class BrowserError(RuntimeError):
    """The browser failed, answered a command with an error, or did not answer in time."""


def find_chromium() -> str | None:
    """Path of the Chromium binary: $MILLIS_CHROMIUM if set (even when missing, so the reason names it),
    else the first of CANDIDATES on PATH."""
    explicit = os.environ.get(ENV_EXECUTABLE)
    if explicit:
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot_dir() -> Path:
    """Directory that keeps screenshots of browser tests: $MILLIS_SCREENSHOTS or tests/.screenshots/."""
    d = Path(os.environ.get(ENV_SCREENSHOTS) or Path(__file__).resolve().parent / ".screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


class Page:
    """One browser tab. `errors` lists what went wrong in it, each as "<kind>: <text>"."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        self.console: list[str] = []  # every console message, as "<type>: <text>"
        self.raw_errors: list[str] = []
        self.loaded = False  # set by Page.loadEventFired

    @property
    def errors(self) -> list[str]:
        self.browser.pump(0.0)  # record what has already arrived
        return list(self.raw_errors)

    def send(self, method: str, params: dict | None = None, timeout_s: float | None = None) -> dict:
        return self.browser.send(method, params, session_id=self.session_id, timeout_s=timeout_s)

    def navigate(self, url: str, timeout_s: float = 20.0) -> None:
        self.loaded = False
        reply = self.send("Page.navigate", {"url": url}, timeout_s=timeout_s)
        if reply.get("errorText"):
            raise BrowserError(f"navigating to {url}: {reply['errorText']}")
        deadline = time.monotonic() + timeout_s
        while not self.loaded:
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not fire its load event within {timeout_s:g} s")
            self.browser.pump(0.05)

    def pump(self, seconds: float) -> None:
        """Let the page run for `seconds` (timers fire, errors are recorded)."""
        self.browser.pump(seconds)

    def evaluate(self, js: str, timeout_s: float = 10.0) -> Any:
        """Value of the JavaScript expression `js` (promises awaited), as JSON-like Python data."""
        reply = self.send("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True,
                                               "timeout": int(timeout_s * 1000)}, timeout_s=timeout_s + 5)
        if "exceptionDetails" in reply:
            raise BrowserError(f"evaluating {js!r}: {describe_exception(reply['exceptionDetails'])}")
        return reply.get("result", {}).get("value")

    def wait_for(self, js_condition: str, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
        """Poll `js_condition` until it is truthy and return its value; BrowserError after `timeout_s`
        (the message carries the last value or exception and the page's errors)."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            try:
                last = self.evaluate(js_condition, timeout_s=max(1.0, timeout_s))
                if last:
                    return last
            except BrowserError as e:  # e.g. the element is not there yet
                last = e
            if time.monotonic() > deadline:
                raise BrowserError(f"condition {js_condition!r} not true within {timeout_s:g} s "
                                   f"(last: {last!r}; page errors: {self.errors})")
            self.browser.pump(interval_s)

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (or of the whole page) to `path`; returns the path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = base64.b64decode(self.send("Page.captureScreenshot", params, timeout_s=30.0)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target_id})

    # events for this page's session, dispatched by Browser.receive
    def on_event(self, method: str, params: dict) -> None:
        if method == "Page.loadEventFired":
            self.loaded = True
        elif method == "Runtime.exceptionThrown":
            self.raw_errors.append("exception: " + describe_exception(params["exceptionDetails"]))
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(remote_text(a) for a in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
            if params.get("type") in ("error", "assert"):
                self.raw_errors.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            # headless Chromium may still ask for /favicon.ico; a missing one is not the page's error
            if entry.get("level") == "error" and not entry.get("url", "").endswith("/favicon.ico"):
                self.raw_errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
                                       .rstrip())


def remote_text(obj: dict) -> str:
    """Readable text of a CDP Runtime.RemoteObject."""
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "?")


def describe_exception(details: dict) -> str:
    exc = details.get("exception") or {}
    where = f" at {details.get('url', '')}:{details.get('lineNumber', 0) + 1}" if details.get("url") else ""
    return f"{details.get('text', 'exception')} {exc.get('description') or remote_text(exc) if exc else ''}" \
           f"{where}".strip()


class Browser:
    """A headless Chromium process and one DevTools websocket to it. Use as a context manager.
    Pages get a `width` x `height` CSS-pixel viewport at device scale 1 (screenshots are that size)."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 800,
                 start_timeout_s: float = 30.0, command_timeout_s: float = 20.0) -> None:
        self.executable = executable
        self.width, self.height = width, height
        self.start_timeout_s = start_timeout_s
        self.command_timeout_s = command_timeout_s
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None  # drains the browser's stderr
        self.profile: str | None = None
        self.ws: Any = None
        self.stderr_lines: list[str] = []  # the browser's stderr, kept for error messages
        self.pages: dict[str, Page] = {}  # by sessionId
        self.next_id = 0

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, path) when a Chromium binary and the websocket client are present, else (False, reason)."""
        try:
            import websockets.sync.client  # noqa: F401
        except ImportError:
            return False, "the `websockets` package is missing, so browser tests are skipped (pip install websockets)"
        exe = find_chromium()
        if exe is None:
            return False, f"chromium not found on PATH, so browser tests are skipped: {INSTALL_HINT}"
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            return False, f"chromium {exe!r} is not an executable file, so browser tests are skipped: {INSTALL_HINT}"
        return True, exe

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        from websockets.sync.client import connect

        ok, exe = (True, self.executable) if self.executable else self.available()
        if not ok:
            raise BrowserError(exe)
        self.profile = tempfile.mkdtemp(prefix="millis-chromium-")
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--mute-audio", "about:blank"]
        # its own process group, so close() can kill the browser with all its helper processes
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self.read_stderr, args=(lines,), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + self.start_timeout_s
        url = None
        while url is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium printed no DevTools URL within {self.start_timeout_s:g} s"
                                   f"{self.stderr_tail()}")
            try:
                m = WS_LINE.search(lines.get(timeout=min(left, 0.2)))
                url = m.group(1) if m else None
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise BrowserError(f"chromium exited with code {self.proc.returncode} at start"
                                       f"{self.stderr_tail()}") from None
        self.ws = connect(url, open_timeout=10, close_timeout=2, max_size=None, compression=None,
                          ping_interval=None, proxy=None)

    def read_stderr(self, lines: queue.Queue[str]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:  # drained to the end, so a chatty browser never blocks on a full pipe
            self.stderr_lines = (self.stderr_lines + [line.rstrip()])[-50:]
            lines.put(line)

    def stderr_tail(self) -> str:
        return "; chromium stderr:\n" + "\n".join(self.stderr_lines[-15:]) if self.stderr_lines else ""

    def open(self, url: str, wait_s: float = 0.0, timeout_s: float = 20.0) -> Page:
        """A new tab showing `url`: waits (at most `timeout_s`) for its load event, then `wait_s` more seconds
        so that timers run and their errors are recorded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        self.pages[session] = page
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        # an exact viewport (the window size would include the headless browser's own toolbar)
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        page.navigate(url, timeout_s=timeout_s)
        if wait_s > 0:
            page.pump(wait_s)
        return page

    def send(self, method: str, params: dict | None = None, session_id: str | None = None,
             timeout_s: float | None = None) -> dict:
        """Send one CDP command and return its result; events that arrive meanwhile are dispatched."""
        if self.ws is None:
            raise BrowserError(f"{method}: the browser is not running")
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        self.ws_call(lambda: self.ws.send(json.dumps(msg)), method)
        timeout_s = self.command_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer from chromium within {timeout_s:g} s")
            reply = self.receive(left)
            if reply is None or reply.get("id") != msg["id"]:
                continue
            if "error" in reply:
                raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}")
            return reply.get("result", {})

    def pump(self, seconds: float) -> None:
        """Dispatch events for `seconds` (0: only those already received)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self.receive(max(left, 0.0)) is None and left <= 0:
                return

    def receive(self, timeout_s: float) -> dict | None:
        """Next message (events dispatched on the way), or None when nothing came within `timeout_s`."""
        try:
            raw = self.ws_call(lambda: self.ws.recv(timeout=timeout_s), "receive")
        except TimeoutError:
            return None
        msg = json.loads(raw)
        if "method" in msg:
            page = self.pages.get(msg.get("sessionId", ""))
            if page is not None:
                page.on_event(msg["method"], msg.get("params", {}))
        return msg

    def ws_call(self, fn: Any, what: str) -> Any:
        from websockets.exceptions import ConnectionClosed

        try:
            return fn()
        except ConnectionClosed as e:
            code = self.proc.poll() if self.proc else None
            raise BrowserError(f"{what}: the DevTools connection closed ({e}); chromium exit code {code}"
                               f"{self.stderr_tail()}") from None

    def close(self) -> None:
        """Kill the browser (its whole process group) and remove its profile; safe to call twice."""
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # closing is best effort: the process is killed next anyway
                pass
            self.ws = None
        if self.proc is not None:
            # TERM then KILL to the whole group: helper processes (renderer, GPU, zygote) die with the browser
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
            if self.reader is not None:
                self.reader.join(timeout=2.0)  # ends at EOF, once every process holding the pipe is gone
            if self.proc.stderr is not None and (self.reader is None or not self.reader.is_alive()):
                self.proc.stderr.close()
            self.proc = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

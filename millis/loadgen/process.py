"""A server in a child process, for benchmarks and tests: the one way they start, wait for and stop
`millis serve` (and a peer server such as Infinity, on a port it is given).

`serve_command` is `python -m millis.cli serve MODEL --host 127.0.0.1 --port 0 FLAGS`: the OS picks a
free port and the server prints it ("listening on http://HOST:PORT"). The child's output goes to a
log file (a pipe nobody reads could fill and stall the server), the address is read back from it,
then GET `ready_path` is polled until it answers 200 (millis: /ready, the model loaded and warmed
up). `stop` sends SIGTERM (millis drains admitted requests and exits 0) and kills only past a timeout.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ADDRESS = re.compile(r"listening on http://([\w.:\[\]-]+):(\d+)")


def serve_command(model: str | Path, *flags: str) -> list[str]:
    """`millis serve` on a free loopback port, in this Python."""
    return [sys.executable, "-m", "millis.cli", "serve", str(model), "--host", HOST, "--port", "0", *flags]


class ServerProcess:
    """`cmd` in a child process; `url` once GET `ready_path` answers 200. port=0: read the port from
    the child's "listening on http://HOST:PORT" line. Raises RuntimeError (with the log's tail) when
    the child exits or is not ready within `ready_timeout`, and leaves no child behind."""

    def __init__(self, cmd: list[str], port: int = 0, ready_path: str = "/ready", log: Path | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 300.0):
        self.cmd, self.host, self.port = cmd, HOST, port
        if log is None:
            fd, name = tempfile.mkstemp(prefix="millis-server-", suffix=".log")
            os.close(fd)
            log = Path(name)
        self.log = Path(log)
        t0 = time.perf_counter()
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.pid = self.proc.pid  # python -m: the server itself, no wrapper process
        try:
            self._wait_ready(ready_path, ready_timeout)
        except BaseException:  # not ready, or interrupted
            self.kill()
            raise
        self.ready_s = time.perf_counter() - t0  # start -> ready (load and warm-up included)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            if not self.port and (m := ADDRESS.search(self.log.read_text(errors="replace"))):
                self.host, self.port = m.group(1), int(m.group(2))
            if self.port and self.get(path)[0] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.cmd[0]}: not ready on {path} after {timeout:g} s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send `sig` and wait for the exit status; past `timeout` kill the child and return None."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    # ---- plain HTTP/1.1, one connection per request (checks and tests; loads use millis.loadgen.client) ----

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body bytes); `body` is sent as JSON, `raw` as it is."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            payload = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, payload
        finally:
            c.close()

    def get(self, path: str) -> tuple[int, bytes]:
        """(status, body); status 0 when nothing answers."""
        try:
            s, _, b = self.request("GET", path, timeout=5)
            return s, b
        except (OSError, http.client.HTTPException):
            return 0, b""

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        """(status, headers, the JSON answer or None)."""
        s, h, b = self.request("POST", path, body, raw)
        return s, h, json.loads(b) if b else None

"""A minimal keep-alive HTTP/1.1 client on asyncio streams.

A load generator that shares the machine with the server must cost little per request: this one
writes one pre-built request and parses only the status line, Content-Length / chunked framing
and `Connection: close`. Both systems under test see the same client.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator
from urllib.parse import urlsplit

from millis.common.errors import MillisError


class Target:
    """Where requests go: host, port and the Host header, from a URL like http://127.0.0.1:8000."""

    def __init__(self, url: str):
        u = urlsplit(url if "://" in url else "http://" + url)
        if u.scheme != "http":
            raise MillisError(f"only http:// URLs are supported, got {url!r}")
        if not u.hostname:
            raise MillisError(f"no host in URL {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.prefix = u.path.rstrip("/")
        self.netloc = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"  # IPv6
        self.url = f"http://{self.netloc}{self.prefix}"

    def request_bytes(self, method: str, path: str, body: bytes = b"") -> bytes:
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body


NO_BODY = (204, 304)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.open = reader, writer, True
        self.requests = 0      # requests sent on this connection
        self.replied = False   # the last request's status line and headers arrived

    @classmethod
    async def connect(cls, t: Target) -> "Conn":
        r, w = await asyncio.open_connection(t.host, t.port)
        return cls(r, w)

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """One request on this connection -> (status, lower-cased headers, body)."""
        self.requests, self.replied = self.requests + 1, False
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.replied = True
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if status in NO_BODY or 100 <= status < 200:  # no body whatever the headers say (RFC 9112 6.3)
            body = b""
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = await self.reader.read()
            self.open = False
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    async def _chunked(self) -> bytes:
        body = b"".join([p async for p in self.pieces({"transfer-encoding": "chunked"})])
        await self.reader.readuntil(b"\r\n")  # the blank line after the last chunk: the connection is reused
        return body

    async def pieces(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive: chunked, Content-Length, or (neither) until the connection closes."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                yield await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        left = int(headers["content-length"]) if "content-length" in headers else -1
        while left != 0:
            piece = await self.reader.read(65536 if left < 0 else min(left, 65536))
            if not piece:
                if left > 0:
                    raise asyncio.IncompleteReadError(b"", left)
                return
            left -= len(piece) if left > 0 else 0
            yield piece

    def stale(self, e: BaseException) -> bool:
        """Did `e` end a request on a reused connection before any byte of its answer? Then the server
        had closed the connection (an idle timeout racing the request) and never saw the request: it may
        be sent again. An OSError mid-head is counted as no answer too (a reset drops what was read)."""
        if self.requests < 2 or self.replied:
            return False
        return not isinstance(e, asyncio.IncompleteReadError) or not e.partial

    def close(self) -> None:
        self.open = False
        self.writer.close()


class Pool:
    """Idle keep-alive connections; a new one is opened when none is idle (open-loop load)."""

    def __init__(self, t: Target):
        self.target, self.idle = t, []

    async def acquire(self) -> Conn:
        while self.idle:
            c = self.idle.pop()
            if c.open and not c.reader.at_eof():  # at EOF: the server closed it while idle
                return c
            c.close()
        return await Conn.connect(self.target)

    async def send(self, raw: bytes) -> int:
        """One request on an idle connection (else a new one) -> its status. A reused connection that
        turns out closed before any byte of the answer is not the server's failure: the request is sent
        again, once, on a new connection. A connection left mid-request (an error, a cancelled wait) is
        closed, never reused."""
        c = await self.acquire()
        try:
            try:
                status, _, _ = await c.send(raw)
            except (OSError, asyncio.IncompleteReadError) as e:
                if not c.stale(e):
                    raise
                c.close()
                c = await Conn.connect(self.target)
                status, _, _ = await c.send(raw)
        except BaseException:
            c.close()
            raise
        self.release(c, True)
        return status

    def release(self, c: Conn, ok: bool) -> None:
        if ok and c.open:
            self.idle.append(c)
        else:
            c.close()

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


async def fetch(t: Target, method: str, path: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection (setup and probes, not load)."""
    c = await asyncio.wait_for(Conn.connect(t), timeout)
    try:
        status, _, data = await asyncio.wait_for(c.send(t.request_bytes(method, path, body)), timeout)
        return status, data
    finally:
        c.close()

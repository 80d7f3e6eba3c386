"""The HTTP connection's own bounds, before a request reaches the app (uvicorn's httptools protocol sets none):

- a request's head (its line and headers) is at most MAX_HEAD_BYTES: past it, 431 and the connection closed. A
  100 MB header was taken whole (2 GB of memory for eight such connections), and httptools copies a growing header
  value on every read, on the event loop: other clients' p50 went from 6 to 595 ms while one was sent;
- a head is complete within HEAD_TIMEOUT_S of its first byte, or of the connection's start: 408 and closed.
  uvicorn times a connection out only between requests, so connections that sent nothing, or half a head, held
  every file descriptor and every other client was refused until their sender let go;
- at most `max_connections` are open (the open-files limit, raised to its hard limit at start, less a reserve for
  the process's own files): one past it is answered 503 and closed, so the server itself keeps the descriptors it
  needs.
A reverse proxy in front still owns per-client limits (rates, connections per address)."""
from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024   # nginx: 4 x 8 KB; Node: 16 KB; vLLM: 4 MB
HEAD_TIMEOUT_S = 15.0        # nginx's client_header_timeout: 60 s; Node's headersTimeout: 60 s
FD_RESERVE = 256             # descriptors kept for the process: model files, threads' pipes, logs


def answer(transport, status: int, reason: bytes) -> None:
    if not transport.is_closing():
        transport.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (status, reason))
        transport.close()


def guarded_protocol(max_connections: int, max_head: int = MAX_HEAD_BYTES, head_timeout_s: float = HEAD_TIMEOUT_S):
    """uvicorn's httptools protocol with the bounds above (uvicorn.Config(http=...))."""

    class Guarded(HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.head_bytes, self.in_head, self.began, self.head_timer = 0, True, False, None
            if len(self.connections) > max_connections:
                answer(transport, 503, b"Service Unavailable")
                return
            self.arm()

        def arm(self) -> None:
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(head_timeout_s, self.head_late)

        def disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_late(self) -> None:
            self.head_timer = None
            answer(self.transport, 408, b"Request Timeout")

        def data_received(self, data: bytes) -> None:
            self.began = False
            super().data_received(data)
            # a head begun within this chunk is counted from the next one (its offset here is the parser's): at
            # most one read past the limit
            if self.in_head and not self.began:
                self.head_bytes += len(data)
                if self.head_bytes > max_head:
                    self.disarm()
                    answer(self.transport, 431, b"Request Header Fields Too Large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_bytes, self.in_head, self.began = 0, True, True
            self.arm()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self.disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return Guarded

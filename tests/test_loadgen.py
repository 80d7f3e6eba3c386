"""`millis bench`'s load generator (millis.loadgen) against small asyncio stub servers in the test's own
loop: what each level counts, the window its throughput is over, timeouts in its percentiles, keep-alive
reuse, the client's own lag, and the inputs it refuses. Levels last about a second."""
from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import numpy as np
import orjson
import pytest

from millis.common.errors import MillisError
from millis.loadgen import discover
from millis.loadgen.client import Conn, Target
from millis.loadgen import run_levels
from millis.loadgen.load import Level, check_lag, parse_levels, percentiles, run_level, settle
from millis.loadgen.streams import gen_level, gen_summary, stream_one

NEVER = object()  # an answer: none (the client times out)
CLOSE = object()  # an answer: the connection closed without one


class Stub:
    """HTTP/1.1 with keep-alive on asyncio streams. answer(n, first) -> (status, body, delay) | NEVER | CLOSE
    for the request whose body is {"n": n}; first: the first request on its connection. A body that is a list
    of SSE events is streamed chunked. idle_close: seconds before an idle connection is closed."""

    def __init__(self, answer, idle_close: float | None = None):
        self.answer, self.idle_close, self.seen = answer, idle_close, []

    async def __aenter__(self) -> Target:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return Target(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}")

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = True
        try:
            while True:
                try:
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), self.idle_close)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                    return
                body = await r.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head)[1]))
                n = orjson.loads(body).get("n", -1) if head.startswith(b"POST") else -1
                self.seen.append(n)
                a = self.answer(n, first) if head.startswith(b"POST") else self.models
                first = False
                if a is CLOSE:
                    return
                if a is NEVER:
                    await asyncio.sleep(5)
                    return
                status, data, delay = a
                await asyncio.sleep(delay)
                if isinstance(data, list):  # server-sent events, chunked; then the connection closes
                    w.write(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                    for ev in data:
                        if isinstance(ev, float):  # a pause between events
                            await asyncio.sleep(ev)
                            continue
                        w.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                        await w.drain()
                    w.write(b"0\r\n\r\n")
                    await w.drain()
                    return
                w.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    models = (200, b'{"data": [{"id": "m", "task": "embed"}]}', 0)


def maker(t: Target):
    k = iter(range(10**6))
    return lambda: t.request_bytes("POST", "/v1/embeddings", orjson.dumps({"n": next(k)}))


def level(answer, lv: Level, duration: float, count: int = 0, timeout: float = 5.0, make=None, seed: int = 3, **kw):
    """One encoder level against a Stub -> (row, the n of every request the stub saw)."""
    async def go():
        stub = Stub(answer, **kw)
        async with stub as t:
            row = await asyncio.wait_for(run_level(t, make(t) if make else maker(t), lv, duration, count, timeout,
                                                   seed=seed), 20)
        return row, stub.seen
    return asyncio.run(go())


def events(n_tokens: int) -> list[bytes]:
    out = [b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'] * n_tokens
    return out + [b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % n_tokens, b"data: [DONE]\n\n"]


def gen(answer, lv: Level, duration: float, count: int = 0, timeout: float = 5.0) -> dict:
    async def go():
        async with Stub(answer) as t:
            results, span = await asyncio.wait_for(gen_level(t, maker(t), lv, duration, count, timeout, 3), 20)
        return gen_summary(lv, results, span, 1.0, 0.1)
    return asyncio.run(go())


def counted(row: dict) -> dict:
    """Every request sent is counted exactly once."""
    assert row["sent"] == (row["ok"] + row["rejected"] + row["shed"] + row["errors"] + row["timeouts"]
                           + row["client_limit"]), row
    return row


def quick(n, first):
    return 200, b"{}", 0


# ---------------------------------------------------------------- 1. throughput over the sending window
def test_open_loop_throughput_is_over_the_sending_window_not_the_last_answer():
    row, _ = level(lambda n, first: (200, b"{}", 2.0 if n == 2 else 0), Level("open", 50), 1.0)
    counted(row)
    # was sent / 3.06 s (the slow answer's end): 16.0 for 49 sent
    assert row["offered_rps"] == pytest.approx(row["sent"] / 1.0, rel=0.1), row
    assert row["rps"] == pytest.approx((row["ok"] - 1) / 1.0, rel=0.1), row  # the slow one came after
    assert row["window_s"] == pytest.approx(1.0, abs=0.1) and row["drain_s"] > 0.8, row


def test_closed_loop_throughput_is_over_its_duration():
    row, _ = level(lambda n, first: (200, b"{}", 2.0 if n == 1 else 0.005), Level("closed", 2), 1.0)
    counted(row)
    assert row["ok"] > 20 and row["rps"] == pytest.approx((row["ok"] - 1) / 1.0, rel=0.05), row  # was ok / 2 s
    assert row["offered_rps"] == pytest.approx(row["sent"] / 1.0, rel=0.05) and row["drain_s"] > 0.8, row
    # bounded by --count: the window ends at the count's last answer (clients send back to back: a client with
    # nothing left to send is idle, not the end; it ended the window at ~9 x 20 ms, leaving the slow answer out)
    row, _ = level(lambda n, first: (200, b"{}", 1.0 if n == 1 else 0.02), Level("closed", 2), 30, count=10)
    assert counted(row)["ok"] == 10 and 0.95 < row["window_s"] < 1.5, row
    assert row["rps"] == pytest.approx(10 / row["window_s"], rel=0.02) and row["drain_s"] == 0, row
    # fewer requests than clients: the idle clients ended the window at once (rps 0, offered_rps in thousands)
    row, _ = level(lambda n, first: (200, b"{}", 0.05), Level("closed", 4), 30, count=2)
    assert counted(row)["ok"] == 2 and 0.04 < row["window_s"] < 0.5, row
    assert row["rps"] == pytest.approx(2 / row["window_s"], rel=0.02), row
    got = gen(lambda n, first: (200, events(2), 0.05), Level("closed", 8), 30, count=4)
    assert got["ok"] == 4 and got["rps"] > 4 and 0.04 < got["seconds"] < 0.6, got  # rps and tokens/s were 0
    assert got["output_tok_s"] == pytest.approx(8 / got["seconds"], rel=0.1), got


def test_generation_throughput_is_over_the_sending_window():
    row = gen(lambda n, first: (200, events(4), 2.0 if n == 1 else 0), Level("open", 20), 1.0)
    counted(row)
    assert row["ok"] == row["sent"] > 5, row
    assert row["rps"] == pytest.approx((row["ok"] - 1) / 1.0, rel=0.1), row  # was ok / 3 s
    assert row["output_tok_s"] == pytest.approx(4 * (row["ok"] - 1) / 1.0, rel=0.1), row
    assert row["offered_rps"] == pytest.approx(row["sent"] / 1.0, rel=0.1) and row["drain_s"] > 0.8, row


# ---------------------------------------------------------------- 2. timeouts in the percentiles
def test_timed_out_requests_count_in_the_percentiles():
    row, _ = level(lambda n, first: NEVER if n % 10 == 9 else (200, b"{}", 0), Level("closed", 4), 30, count=40,
                   timeout=0.3)
    assert counted(row)["timeouts"] == 4 and row["ok"] == 36, row
    assert row["p99_ms"] is None and row["p90_ms"] is None and row["max_ms"] is None, row  # p99 was a few ms
    assert set(row["beyond_timeout"]) == {"p90_ms", "p99_ms", "max_ms"}
    assert 0 < row["p50_ms"] < 300 and row["answered_p99_ms"] < 300, row


def test_percentiles_are_null_only_where_a_failure_decides_them():
    lat, ok = np.arange(200.0), np.ones(200, bool)
    ok[-1] = False  # one failure in 200: p99 stands, the max does not
    got, beyond = percentiles(lat, ok, {"p50": 50, "p99": 99, "max": 100}, 3)
    assert got["p50"] == pytest.approx(99.5) and got["p99"] is not None and got["max"] is None and beyond == ["max"]
    got, beyond = percentiles(np.array([5.0, 1.0]), np.array([False, True]), {"p50": 50}, 3)
    assert got["p50"] is None and beyond == ["p50"]  # a fast failure is no fast latency


def test_generation_timeouts_count_in_ttft_and_e2e():
    row = gen(lambda n, first: NEVER if n == 2 else (200, events(2), 0), Level("closed", 2), 30, count=6, timeout=0.3)
    assert counted(row)["timeouts"] == 1 and row["ok"] == 5, row
    assert row["ttft_p99_ms"] is None and row["e2e_p99_ms"] is None and row["ttft_p50_ms"] < 300, row
    assert {"ttft_p99_ms", "e2e_p99_ms"} <= set(row["beyond_timeout"])


# ---------------------------------------------------------------- 3, 5. every request counted once; 503 is shed
def test_every_outcome_is_counted_once():
    kinds = [(200, b"{}", 0), (429, b"{}", 0), (503, b"{}", 0), (500, b"{}", 0), CLOSE, NEVER]
    row, _ = level(lambda n, first: kinds[n % 6], Level("closed", 1), 30, count=12, timeout=0.3)
    assert row["errors"] == 4, row  # 500 and the dropped connection; 503 used to be an error too
    assert counted(row) and (row["ok"], row["rejected"], row["shed"], row["timeouts"]) == (2, 2, 2, 2), row


def test_an_empty_stream_is_an_error():
    def answer(n, first):
        if n == 1:
            return 200, [b"data: [DONE]\n\n"], 0      # streamed, no content
        if n == 3:
            return 200, b'{"choices": []}', 0        # not streamed at all
        return (503, b"{}", 0) if n == 4 else (200, events(3), 0)
    row = gen(answer, Level("closed", 1), 30, count=6)
    assert counted(row) and row["empty_stream"] == 2 and row["errors"] == 2, row  # were counted nowhere
    assert row["ok"] == 3 and row["shed"] == 1 and row["goodput"] == 0.5, row


# ---------------------------------------------------------------- 4. keep-alive connections the server closed
def test_connections_closed_while_idle_are_not_errors(monkeypatch):
    sends, send = [], Conn.send

    async def counting(self, raw):
        sends.append(raw)
        return await send(self, raw)
    monkeypatch.setattr(Conn, "send", counting)
    # seed 18 at 3/s: every gap >= 67 ms, far past the server's 10 ms idle close (no race)
    row, seen = level(quick, Level("open", 3), 10, count=8, seed=18, idle_close=0.01)
    assert counted(row)["ok"] == row["sent"] == 8 and row["errors"] == 0, row  # were errors
    assert sorted(seen) == list(range(8)) and len(sends) == 8  # none sent on a connection seen closed


def test_a_reused_connection_closed_before_any_answer_is_retried_once():
    row, seen = level(lambda n, first: (200, b"{}", 0) if first else CLOSE, Level("closed", 1), 30, count=5)
    assert counted(row)["ok"] == 5 and row["errors"] == 0, row
    assert seen == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # each reuse found closed, then a new connection
    answered = set()

    def once(n, first):  # only the very first request is answered: a retry that fails too is an error
        if answered:
            return CLOSE
        answered.add(n)
        return 200, b"{}", 0
    row, seen = level(once, Level("closed", 1), 30, count=3)
    assert counted(row)["ok"] == 1 and row["errors"] == 2 and seen == [0, 1, 1, 2], (row, seen)


# ---------------------------------------------------------------- 6. the client's own lag
def test_a_client_that_sends_late_is_flagged():
    def slow_maker(t):
        make = maker(t)

        def blocking():
            time.sleep(0.03)  # the client's loop is blocked: it cannot send 100/s
            return make()
        return blocking
    row, _ = level(quick, Level("open", 100), 0.5, make=slow_maker)
    counted(row)
    assert row["send_lag_p99_ms"] > 50 and "client lag" in row["warnings"][0], row
    assert row["offered_rps"] < 50, row  # over the time the sends took, not the 0.5 s asked for
    assert check_lag({"p50_ms": 10.0}, [0.0005] * 100)["warnings"] == []
    assert check_lag({"p50_ms": 100.0}, [0.004] * 100)["warnings"] == []  # under 5% of p50
    assert check_lag({"p50_ms": 10.0}, [0.002] * 100)["send_lag_p99_ms"] == 2.0
    assert check_lag({"p50_ms": 10.0}, [0.002] * 100)["warnings"]


# ---------------------------------------------------------------- 7. inputs refused, setups that hang
@pytest.mark.parametrize("rate", ["inf", "nan", "1e999", "0", "-2", "1_0", "x"])
def test_bad_rates_are_refused_naming_the_flag(rate):
    with pytest.raises(MillisError, match="--rate"):
        parse_levels("", f"5,{rate}")


@pytest.mark.parametrize("conc", ["0", "-1", "2.5", "1_0"])
def test_bad_concurrency_is_refused_naming_the_flag(conc):
    with pytest.raises(MillisError, match="--concurrency"):
        parse_levels(conc, "")


@pytest.mark.parametrize("body", [b'{"data": []}', b"not json", b"[]", b'{"data": [5]}'])
def test_discover_explains_a_models_route_without_a_card(body):
    async def go():
        stub = Stub(quick)
        stub.models = (200, body, 0)
        async with stub as t:
            return await discover(t, "", "", 5.0)
    with pytest.raises(MillisError, match=r"/v1/models.*--route and --model"):
        asyncio.run(go())


def test_a_connect_that_hangs_is_a_timeout():
    """A listener whose accept queue is full: the kernel drops the SYNs and connect() waits."""
    lsock, held = socket.socket(), socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    held.connect(lsock.getsockname())  # fills the queue
    t = Target(f"http://127.0.0.1:{lsock.getsockname()[1]}")

    async def go():
        row = await asyncio.wait_for(run_level(t, maker(t), Level("closed", 1), 30, 2, 0.2), 5)
        s = await asyncio.wait_for(stream_one(t, maker(t)(), 0.2, time.perf_counter()), 5)
        return row, s
    try:
        row, s = asyncio.run(go())
    finally:
        held.close()
        lsock.close()
    assert counted(row)["timeouts"] == 2 and s.status == -1, row


# ---------------------------------------------------------------- the command's output
def test_millis_bench_prints_the_new_columns(tmp_path, capsys, monkeypatch):
    """The table: shed (503), offered rate, drain, send lag, and a percentile past the timeout marked."""
    from millis.cli.main import main

    loop, ready, box, arrived = asyncio.new_event_loop(), threading.Event(), {}, iter(range(100))

    def answer(n, first):  # by arrival: the command's bodies are texts
        k = next(arrived)
        return NEVER if k % 4 == 3 else (503 if k % 4 == 2 else 200, b"{}", 0)

    def serve():
        async def up():
            box["stub"] = Stub(answer)
            box["t"] = await box["stub"].__aenter__()
            ready.set()
        loop.run_until_complete(up())
        loop.run_forever()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(10)
    (tmp_path / "q.txt").write_text("hello\n")
    monkeypatch.setenv("COLUMNS", "250")
    try:
        rc = main(["bench", box["t"].url, "--data", str(tmp_path / "q.txt"), "--concurrency", "2", "--duration", "30",
                   "--count", "8", "--timeout", "0.3", "--warmup", "0", "--out", str(tmp_path / "out")])
    finally:
        async def down():  # the stub's connections still waiting (the timed-out requests) end here
            box["stub"].server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(down(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        loop.close()
    out = capsys.readouterr().out
    assert rc == 0, out
    res = orjson.loads((tmp_path / "out" / "bench.json").read_bytes())
    row = counted(res["rows"][0])
    assert (row["ok"], row["shed"], row["timeouts"]) == (4, 2, 2) and row["p99_ms"] is None, row
    assert all(k in row for k in ("send_lag_p99_ms", "warnings", "drain_s", "window_s", "offered_rps"))
    for col in ("503", "offered/s", "drain s", "send lag p99 ms", ">=timeout"):
        assert col in out, out
    assert main(["bench", box["t"].url, "--data", str(tmp_path / "q.txt"), "--rate", "inf"]) == 2
    assert "--rate" in capsys.readouterr().err
    assert main(["bench", box["t"].url, "--data", str(tmp_path / "q.txt"), "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


# ---------------------------------------------------------------- servers framed otherwise
class Raw:
    """A server that writes `reply` (raw bytes) to every request and closes the connection when `close`."""

    def __init__(self, reply: bytes, close: bool = True):
        self.reply, self.close, self.count = reply, close, 0

    async def __aenter__(self) -> Target:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return Target(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}")

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def serve(self, r, w) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                await r.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head)[1]))
                self.count += 1
                w.write(self.reply)
                await w.drain()
                if self.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            w.close()


SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
CHUNK = b'{"choices": [{"delta": {"content": "x"}}]}'


def chunked(body: bytes) -> bytes:
    return SSE + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"%x\r\n%s\r\n" % (1, body[i:i + 1])
                                                               for i in range(len(body))) + b"0\r\n\r\n"


@pytest.mark.parametrize("body, tokens", [
    (b"data:" + CHUNK + b"\n\ndata:" + CHUNK + b"\n\ndata: [DONE]\n\n", 2),  # no space (axum, TGI)
    (b"event: token\nid: 1\ndata: " + CHUNK + b"\n\n: a comment\n\ndata: [DONE]\n\n", 1),
    (b"data: " + CHUNK + b"\r\rdata: " + CHUNK + b"\r\r", 2),  # CR-only framing
    (b'data: "a string"\n\ndata: {"choices": "x"}\n\ndata: ' + CHUNK + b"\n\n", 1),  # crashed the run
    (b'data: {"choices": [{"delta": \ndata: {"content": "x"}}]}\n\n', 1),  # an event over two data lines
])
def test_server_sent_events_in_every_framing_the_standard_allows(body, tokens):
    async def go(reply):
        async with Raw(reply) as t:
            return await stream_one(t, maker(t)(), 5.0, time.perf_counter())
    for reply in (chunked(body), SSE + b"\r\n" + body):  # chunked byte by byte; or to the connection's close
        got = asyncio.run(go(reply))
        assert got.status == 200 and got.tokens == tokens and got.ttft is not None, (reply, got)


def test_warm_up_and_a_body_less_answer_against_servers_that_close_or_send_none():
    from millis.loadgen.load import warm

    async def go(reply, close):
        async with Raw(reply, close) as t:
            await asyncio.wait_for(warm(t, maker(t), 3, 2.0), 5)  # raised IncompleteReadError on the 2nd
            return await asyncio.wait_for(run_level(t, maker(t), Level("closed", 1), 30, 3, 1.0), 5)
    row = asyncio.run(go(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", True))
    assert counted(row)["ok"] == 3, row
    row = asyncio.run(go(b"HTTP/1.1 204 No Content\r\n\r\n", False))  # no length: it waited for the close
    assert counted(row)["ok"] == 3 and row["timeouts"] == 0 and row["p99_ms"] < 500, row


def test_the_clients_own_descriptor_limit_is_not_a_server_error():
    import errno

    from millis.loadgen.load import CLIENT_LIMIT, Recorder, failed, summarize

    assert failed(OSError(errno.EMFILE, "Too many open files")) == CLIENT_LIMIT
    assert failed(OSError(errno.ECONNRESET, "reset")) == 0 and failed(ValueError("bad status")) == 0
    rec = Recorder()
    rec.t_first, rec.t_end = 0.0, 1.0
    for k in range(10):
        rec.add(0.01, CLIENT_LIMIT if k < 3 else 200, 0.1 + k / 20, 0.0)
    row = counted(summarize(Level("open", 10), rec))
    assert (row["errors"], row["client_limit"], row["ok"]) == (0, 3, 7) and row["p99_ms"] == 10.0, row
    assert any("file descriptors" in w for w in row["warnings"]), row["warnings"]


def test_an_ipv6_target_keeps_its_brackets():
    t = Target("http://[::1]:8000/api")
    assert (t.host, t.port, t.url) == ("::1", 8000, "http://[::1]:8000/api")
    assert b"Host: [::1]:8000\r\n" in t.request_bytes("GET", "/v1/models")


# ---------------------------------------------------------------- streams as servers send them
def test_an_error_event_after_content_is_an_error_not_an_answer():
    """millis's server, failing a stream after its 200, sends {"error": ...} then [DONE]: it counted as ok."""
    def answer(n, first):
        if n % 2:
            return 200, [*events(3)[:3], b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n',
                         b"data: [DONE]\n\n"], 0
        return 200, events(3), 0
    row = gen(answer, Level("closed", 1), 30, count=6)
    assert counted(row) and row["stream_error"] == 3 and row["errors"] == 3 and row["ok"] == 3, row
    assert row["goodput"] == 0.5 and row["output_tokens"] == 9, row


def test_time_per_token_reads_every_token_of_an_event():
    """Four tokens an event, an event each 40 ms: 10 ms a token (ITL per event read 40 ms and 25 tokens/s)."""
    ev = b'data: {"choices": [{"delta": {"content": "wxyz"}}]}\n\n'
    body = [ev, *[x for _ in range(5) for x in (0.04, ev)],
            b'data: {"choices": [], "usage": {"completion_tokens": 24}}\n\n', b"data: [DONE]\n\n"]
    row = gen(lambda n, first: (200, body, 0), Level("closed", 1), 30, count=3)
    assert row["ok"] == 3 and row["tokens_per_event"] == 4.0, row
    assert 8.0 < row["tpot_p50_ms"] < 12.0 and 35.0 < row["itl_p50_ms"] < 50.0, row  # 200 ms over 23 tokens
    assert 80 < row["request_tok_s_p50"] < 125, row
    assert row["n"] == 3 and any("few samples" in w for w in row["warnings"]), row


def test_a_level_after_an_overload_waits_for_the_backlog():
    """A server of one worker, 20 ms a request, keeps working on what the client gave up on: a light level run
    right after an overloaded one timed out every request; settled first, it is answered as when idle."""
    free_at = [0.0]

    def fifo(n, first):
        now = time.monotonic()
        free_at[0] = max(now, free_at[0]) + 0.02
        return 200, b"{}", free_at[0] - now

    async def go(idle_ms):
        async with Stub(fifo) as t:
            return await asyncio.wait_for(run_levels(t, maker(t), [Level("open", 200), Level("closed", 1)], 0.5, 0,
                                                     0.3, 3, idle_ms=idle_ms), 30)
    over, after = asyncio.run(go(20.0))
    assert over["timeouts"] > 20 and after["timeouts"] == 0 and after["ok"] > 5, (over, after)
    assert after["settle_s"] > 0.5 and after["p50_ms"] < 300, after  # the backlog was seconds
    assert over["client_cpu"] >= 0 and "settle_s" in over, over


def test_settle_gives_up_and_says_so():
    async def slow():
        return 1e3
    waited, settled = asyncio.run(settle(slow, 50.0, cap_s=0.5))
    assert not settled and 0.5 <= waited < 2.0

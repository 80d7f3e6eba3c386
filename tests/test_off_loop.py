"""millis.serve.http.off_loop: work a request hands to a thread (tokenizing a large body, compiling a grammar)
runs on at most OFF_LOOP_THREADS threads at once; callers past those wait their turn, and past OFF_LOOP_WAITING
waiting a request is refused with 429 rather than starting yet another thread. A thread's slot frees when its
work ends, whether or not its caller still waits."""
import asyncio
import threading
import time

import pytest

from millis.serve import http
from millis.serve.schemas import ApiError


def test_off_loop_bounds_its_threads_and_refuses_past_the_waiting_limit(monkeypatch):
    monkeypatch.setattr(http, "OFF_LOOP_THREADS", 2)
    monkeypatch.setattr(http, "OFF_LOOP_WAITING", 3)
    running, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i

    async def go():
        calls = [asyncio.ensure_future(http.off_loop(work, i)) for i in range(5)]  # 2 run, 3 wait
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as e:  # a sixth: past the waiting limit
            await http.off_loop(work, 5)
        assert e.value.status == 429 and e.value.headers.get("Retry-After") == "1"
        assert await asyncio.gather(*calls) == [0, 1, 2, 3, 4]
        # a caller that stops waiting leaves its call to finish; its slot frees when the thread ends
        gone = asyncio.ensure_future(http.off_loop(work, 6))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await asyncio.gather(*(http.off_loop(work, i) for i in range(4))) == [0, 1, 2, 3]

    asyncio.run(go())
    assert peak[0] == 2


def test_off_loop_hands_back_the_callers_exception():
    def boom():
        raise ValueError("bad grammar")

    async def go():
        with pytest.raises(ValueError, match="bad grammar"):
            await http.off_loop(boom)
        assert await http.off_loop(lambda: 7) == 7  # the failed call's slot is free again

    asyncio.run(go())

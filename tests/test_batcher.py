"""The queue owner on its own: bucketing, token budget, admission, dropped clients, drain."""
import asyncio

import numpy as np
import pytest

from millis.encoder.text import bucket_length
from millis.serve.encoder.batcher import Batcher, Job, Overloaded, ShuttingDown
from millis.serve.http import ClientGone


class Recorder:
    """A fake runtime: output row = [bucket T, first token id]; remembers every call."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[int, int]] = []   # (rows, T)
        self.delay = delay

    def __call__(self, rows, t):
        import time

        if self.delay:
            time.sleep(self.delay)
        assert all(len(r) <= t for r in rows), "a row longer than its bucket"
        self.calls.append((len(rows), t))
        return np.array([[t, r[0]] for r in rows], dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


def make_job(*lengths, first=0):
    return Job([[first + k] * n for k, n in enumerate(lengths)], asyncio.get_running_loop().create_future())


async def run_all(b: Batcher, jobs: list[Job]) -> None:
    """Queue every job, start the batcher, wait for all, drain it."""
    for j in jobs:
        b.submit(j)
    b.start()
    await asyncio.gather(*(j.future for j in jobs))
    await b.close()


class PadRecorder:
    """A fake Runtime for run_texts: remembers each call's (rows, T); row i answers [T, its real tokens]."""

    name, input_names, output_name = "recorder", ("input_ids", "attention_mask", "token_type_ids"), "out"

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def run(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        self.calls.append(ids.shape)
        return {"out": np.stack([np.full(len(ids), ids.shape[1]), mask.sum(1)], 1).astype(np.float32)}


def test_bucket_length_rule():
    assert [bucket_length(n, 128) for n in (1, 16, 17, 32, 33, 127, 128)] == [16, 16, 32, 32, 48, 128, 128]
    assert bucket_length(200, 40) == 40 and bucket_length(0, 128) == 16


def test_run_texts_and_the_batcher_pad_a_text_alike(tiny_dirs):
    """run_texts (millis.load, the CLI) and the server's batcher pad the same text to the same length."""
    from millis.artifact.model import run_texts
    from millis.encoder.text import TextEncoder

    enc = TextEncoder(tiny_dirs["bert"], PadRecorder.input_names, max_length=40)
    texts = [" ".join(["card"] * k) for k in (30, 1, 14, 60, 13, 15)]
    rows = enc.token_ids(texts)[0]
    assert [len(r) for r in rows] == [32, 3, 16, 40, 15, 17]  # 60 words: cut to max_length 40

    rt = PadRecorder()  # one text per call: each runs at its own bucket
    res = run_texts(rt, enc, texts, max_batch=1)
    alone = [32, 16, 16, 40, 16, 32]
    assert res.outputs[:, 0].tolist() == alone and res.outputs[:, 1].tolist() == [32, 3, 16, 40, 15, 17]
    assert sorted(rt.calls) == sorted((1, t) for t in alone)

    rt = PadRecorder()  # sorted by length, cut into batches of 3, each padded to its longest row's bucket
    res = run_texts(rt, enc, texts, max_batch=3)
    assert rt.calls == [(3, 16), (3, 40)]
    assert res.outputs[:, 0].tolist() == [40, 16, 16, 40, 16, 40] and res.tokens == [32, 3, 16, 40, 15, 17]

    async def batcher_lengths():
        rec = Recorder()
        b = Batcher(rec, max_length=40, max_batch=1, max_tokens=4096, max_wait_s=0, max_queue=100)
        jobs = [Job([r], asyncio.get_running_loop().create_future()) for r in rows]
        await run_all(b, jobs)
        return [int(j.out[0][0]) for j in jobs]
    assert run(batcher_lengths()) == alone


def test_rows_grouped_by_bucket_and_token_budget_respected():
    async def go():
        rec = Recorder()
        b = Batcher(rec, max_length=128, max_batch=8, max_tokens=64, max_wait_s=0, max_queue=100)
        jobs = [make_job(5, 40, 9, first=10 * i) for i in range(3)]   # 6 rows of T=16, 3 of T=48
        await run_all(b, jobs)
        return rec, jobs

    rec, jobs = run(go())
    # T=16: budget 64 tokens -> at most 4 rows per call; T=48 -> 1 row per call
    assert all(rows * t <= 64 for rows, t in rec.calls)
    assert sorted(t for _, t in rec.calls) == [16, 16, 48, 48, 48]
    for i, j in enumerate(jobs):   # outputs back in each request's own row order
        assert [tuple(o) for o in j.out] == [(16, 10 * i), (48, 10 * i + 1), (16, 10 * i + 2)]
        assert j.queue_s >= 0 and j.infer_s > 0
        assert len(j.batch_rows) >= 2 and min(j.batch_rows) >= 1  # its rows span two buckets: two calls


def test_full_queue_raises_overloaded_and_queues_nothing():
    async def go():
        b = Batcher(Recorder(), 128, 8, 4096, 0, max_queue=4)
        b.submit(make_job(3, 3, 3))
        b.submit(make_job(3, 3))  # 3 rows wait, under 4: admitted whatever its size (a large request was starved
        assert b.depth == 5       # by small ones that kept the queue above max_queue - its rows)
        with pytest.raises(Overloaded) as e:
            b.submit(make_job(3))
        assert b.depth == 5 and e.value.retry_after_s >= 1
    run(go())


def test_retry_after_is_the_queues_time_at_the_measured_rate():
    """Retry-After: the queued rows' padded tokens over the tokens a second calls took (1 before any call, at most
    MAX_RETRY_AFTER_S). The rate started from 0 and counted rows alike: a fresh server that ran its flood in 2 s
    told its 429s to come back in 39 s."""
    from millis.serve.encoder.batcher import MAX_RETRY_AFTER_S

    def refused(b: Batcher) -> int:
        with pytest.raises(Overloaded) as e:
            b.submit(make_job(16))
        return e.value.retry_after_s

    async def go():
        fresh = Batcher(Recorder(), 128, 8, 4096, 0, max_queue=1)
        fresh.submit(make_job(16))
        before = refused(fresh)             # no call yet: nothing measured
        b = Batcher(Recorder(delay=0.5), 128, 8, 4096, 0, max_queue=40)
        first = make_job(*[16] * 8)
        b.submit(first)
        b.start()
        await first.future                  # one call: 8 rows x 16 tokens in ~0.5 s, ~256 tokens a second
        queued = make_job(*[16] * 40)
        b.submit(queued)                    # 640 tokens: ~2.5 s
        got = refused(b)
        queued.drop(ClientGone("left"))     # its rows wait for nothing now: a request is admitted again
        long = make_job(*[16] * 600)
        b.submit(long)
        capped = b.retry_after_s()          # 640 rows of 16 tokens (the gone ones are popped too): ~40 s
        long.drop(ClientGone("left"))
        await b.close()
        return before, got, capped

    before, got, capped = run(go())
    assert before == 1 and 3 <= got <= 6, (before, got)  # the old estimate: 40 rows at 0.2 x 16 rows a second, 13 s
    assert capped == MAX_RETRY_AFTER_S


def test_gone_rows_are_skipped_not_run():
    async def go():
        rec = Recorder()
        b = Batcher(rec, 128, 8, 4096, 0, 100)
        keep, gone = make_job(4, 4, first=0), make_job(4, 4, 4, first=100)
        b.submit(keep)
        b.submit(gone)
        gone.drop(ClientGone("client disconnected"))
        b.start()
        await keep.future
        await b.close()
        with pytest.raises(ClientGone):
            gone.future.result()
        return rec

    rec = run(go())
    assert rec.calls == [(2, 16)]     # only the two live rows ran


def test_max_wait_coalesces_and_zero_wait_does_not_idle():
    async def go(wait):
        rec = Recorder()
        b = Batcher(rec, 128, 32, 4096, wait, 100)
        b.start()
        jobs = []
        for i in range(4):
            jobs.append(make_job(5, first=i))
            b.submit(jobs[-1])
            await asyncio.sleep(0.005)
        await asyncio.gather(*(j.future for j in jobs))
        await b.close()
        return rec.calls

    assert run(go(0.2)) == [(4, 16)]          # one batch: all four arrived within the wait
    assert len(run(go(0.0))) >= 2             # greedy: the first ran at once, alone


def test_close_drains_then_refuses():
    async def go():
        rec = Recorder(delay=0.01)
        b = Batcher(rec, 128, 2, 4096, 0, 100)
        b.start()
        jobs = [make_job(5, 20, first=i) for i in range(5)]
        for j in jobs:
            b.submit(j)
        await b.close()
        assert all(j.future.done() and j.future.exception() is None for j in jobs)
        with pytest.raises(ShuttingDown):
            b.submit(make_job(5))
        return rec

    rec = run(go())
    assert sum(r for r, _ in rec.calls) == 10


def test_expire_answers_the_waiting_and_refuses_later_requests():
    """Near the drain's limit: requests none of whose rows started get ShuttingDown (their rows never run), one
    whose rows are running finishes, and a request that arrives after is refused at once (it would be cut off)."""
    async def go():
        rec = Recorder(delay=0.05)
        b = Batcher(rec, 128, 1, 4096, 0, 100)
        b.start()
        jobs = [make_job(5, first=i) for i in range(4)]
        for j in jobs:
            b.submit(j)
        await asyncio.sleep(0.02)  # the first row is in the runtime
        assert b.expire(ShuttingDown("drain limit")) == 3
        with pytest.raises(ShuttingDown):
            b.submit(make_job(5))
        done = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        await b.close()
        return rec, done

    rec, done = run(go())
    assert done[0] is None and all(isinstance(d, ShuttingDown) for d in done[1:])
    assert rec.calls == [(1, 16)]  # only the row that had started ran


def test_runtime_failure_fails_that_batch_only():
    async def go():
        calls = {"n": 0}

        def flaky(rows, t):
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError("boom")
            return np.zeros((len(rows), 2), np.float32)

        b = Batcher(flaky, 128, 1, 4096, 0, 100)
        j1, j2 = make_job(5), make_job(5)
        b.submit(j1)
        b.submit(j2)
        b.start()
        await asyncio.wait({j1.future, j2.future})
        await b.close()
        with pytest.raises(RuntimeError, match="runtime failed: boom"):
            j1.future.result()
        assert j2.future.result() is None and j2.out[0].shape == (2,)
    run(go())


def test_a_row_the_runtime_refuses_fails_its_own_request_not_its_batch_mates():
    """Three requests in one batch, one holding a row the runtime raises on (token id 999 here; in a server, any
    row the model cannot take): the batch fails, each request runs again alone, and only that one fails."""
    async def go():
        calls: list[int] = []

        def strict(rows, t):
            calls.append(len(rows))
            if any(999 in r for r in rows):
                raise ValueError("token id 999 is out of range")
            return np.array([[t, r[0]] for r in rows], np.float32)

        b = Batcher(strict, 128, 8, 4096, 0, 100)
        good1, bad, good2 = make_job(5, 6, first=1), Job([[999] * 5], asyncio.get_running_loop().create_future()), \
            make_job(4, first=7)
        for j in (good1, bad, good2):
            b.submit(j)
        b.start()
        await asyncio.wait({good1.future, bad.future, good2.future})
        await b.close()
        with pytest.raises(RuntimeError, match="out of range"):
            bad.future.result()
        assert good1.future.result() is None and good2.future.result() is None
        assert [o[1] for o in good1.out] == [1, 2] and good2.out[0][1] == 7
        assert calls == [4, 2, 1, 1]  # the batch, then each request alone
    run(go())


def test_the_server_loads_warms_and_runs_its_model_in_one_thread(tiny_dirs):
    """torch's OpenMP teams are per thread: a second thread's team makes libgomp stop spinning on 2 cores
    (torch eager 3x slower). The encoder server's loader, warm-up and every runtime call share one thread."""
    import threading

    from millis.artifact.model import open_model
    from millis.serve.config import ServeConfig
    from millis.serve.encoder.app import State

    seen: list[tuple[str, int]] = []

    def loader():
        seen.append(("load", threading.get_ident()))
        model = open_model(tiny_dirs["bert"])
        inner = model.runtime.run

        def recorded(batch):
            seen.append(("run", threading.get_ident()))
            return inner(batch)
        model.runtime.run = recorded
        return model

    async def go():
        st = State(ServeConfig(artifact=str(tiny_dirs["bert"])), loader)
        await st.load()
        assert st.load_error is None and st.batcher is not None
        warm_runs = len(seen) - 1
        job = Job([[2, 5, 7, 3]], asyncio.get_running_loop().create_future())
        st.batcher.submit(job)
        await job.future
        await st.close()
        return warm_runs, job

    warm_runs, job = run(go())
    assert warm_runs >= 1 and job.out[0] is not None and np.isfinite(job.out[0]).all()
    kinds = [k for k, _ in seen]
    assert kinds[0] == "load" and kinds.count("run") == warm_runs + 1
    assert len({t for _, t in seen}) == 1 and seen[0][1] != threading.get_ident()


class ScaleSharingRuntime:
    """A fake runtime that declares its rows share one activation scale (as ORT's dynamic int8 per tensor):
    remembers the requests (each row's second token marks its request) of every call."""

    name, input_names, output_name = "fake-dynamic-int8", ("input_ids", "attention_mask", "token_type_ids"), "logits"
    shares_scales_across_rows = True

    def __init__(self):
        self.calls: list[set[int]] = []

    def run(self, batch):
        ids = batch["input_ids"]
        self.calls.append(set(ids[:, 1].tolist()))
        return {"logits": np.zeros((len(ids), 2), np.float32)}


def test_rows_never_share_a_call_on_a_runtime_whose_rows_share_scales(tiny_dirs):
    from millis.artifact.model import open_model
    from millis.serve.config import ServeConfig
    from millis.serve.encoder.app import State

    fake = ScaleSharingRuntime()

    def loader():
        model = open_model(tiny_dirs["bert"])
        model.runtime = fake
        return model

    async def go():
        st = State(ServeConfig(artifact=str(tiny_dirs["bert"]), max_wait_ms=20), loader)
        await st.load()
        assert st.load_error is None
        fake.calls.clear()  # the warm-up's
        loop = asyncio.get_running_loop()
        jobs = [Job([[101, 7, 102], [101, 7, 7, 7, 102]], loop.create_future()),  # two requests, one bucket
                Job([[101, 9, 9, 102]], loop.create_future()), Job([[101, 11, 102]], loop.create_future())]
        for job in jobs:  # in one loop turn: all queued before the batcher looks
            st.batcher.submit(job)
        await asyncio.gather(*(j.future for j in jobs))
        await st.close()
        return jobs

    jobs = run(go())
    assert fake.calls == [{7}, {7}, {9}, {11}], f"requests (by marker) of each runtime call: {fake.calls}"
    assert [j.batch_rows for j in jobs] == [[1, 1], [1], [1]]  # a request's own rows too: one a call


def test_rows_of_a_request_gone_do_not_count_as_waiting():
    """A client that left (or timed out) still held its rows' places in the queue until the running call ended and
    popped them: new requests got 429 with no live row waiting."""
    async def go():
        b = Batcher(Recorder(), 128, 8, 4096, 0, max_queue=4)
        gone = make_job(3, 3, 3, 3)
        b.submit(gone)
        with pytest.raises(Overloaded):
            b.submit(make_job(3))
        gone.drop(ClientGone("client disconnected"))
        b.submit(make_job(3))  # was: 429, 4 rows queued
        assert b.depth == 5 and b.gone_rows == 4
        b.start()
        await b.close()
        assert b.depth == 0 and b.gone_rows == 0
    run(go())


def test_warm_up_runs_the_length_buckets_up_to_512_tokens(tiny_dirs):
    """A ModernBERT's 8,192 positions were 512 warm-up calls (185 s before /ready at hidden size 64, hours at its real
    size): buckets past WARM_MAX_TOKENS warm on their first request."""
    from millis.artifact.model import open_model
    from millis.serve.config import WARM_MAX_TOKENS, ServeConfig
    from millis.serve.encoder.app import State

    lengths: list[int] = []

    def loader():
        model = open_model(tiny_dirs["bert"])
        model.max_length = 8192

        def recorded(batch):  # the shapes warm-up asks for, not run (the tiny model has 128 positions)
            lengths.append(batch["input_ids"].shape[1])
            return {model.runtime.output_name: np.zeros((batch["input_ids"].shape[0], 32), np.float32)}
        model.runtime.run = recorded
        return model

    async def go():
        st = State(ServeConfig(artifact=str(tiny_dirs["bert"])), loader)
        await st.load()
        assert st.load_error is None and st.dim == 32
        await st.close()

    run(go())
    assert sorted(set(lengths)) == list(range(16, WARM_MAX_TOKENS + 1, 16)) and WARM_MAX_TOKENS == 512

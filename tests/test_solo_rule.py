"""The shared-machine rule (kernels/solo_rule.h) of the decoder's steps and the encoder's forwards: passes whose
caller waited over a third of a window's time for preempted workers send the passes of the next 100 ms to the caller
alone, then the workers are tried again for a window (twice as long alone each time that window is contended too,
up to 1.6 s; a quiet window starts over at 100 ms); quiet passes and one-thread passes never go solo."""
import ctypes

import numpy as np
import pytest

from millis.kernels.native import build, native_isa


@pytest.fixture(scope="module", params=["llama_step", "bert_forward"])
def replay(request):
    from millis.encoder.native import SOURCES
    from millis.gen.models.native_llama import KERNEL_SOURCES

    isa = native_isa()
    if isa is None:
        pytest.skip("native kernels are off (MILLIS_NO_KERNELS)")
    lib = build(request.param, KERNEL_SOURCES if request.param == "llama_step" else SOURCES, isa)
    f = lib.solo_rule_replay
    f.restype = ctypes.c_int64
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double,
                  ctypes.c_void_p]

    def run(pass_ms, wait_ms, threads=2, window_ms=50.0, gap_ms=None):
        p = np.asarray(pass_ms, np.float64) * 1e6
        w = np.asarray(wait_ms, np.float64) * 1e6
        g = None if gap_ms is None else np.asarray(gap_ms, np.float64) * 1e6
        solo = np.zeros(len(p), np.int32)
        entered = f(len(p), p.ctypes.data, w.ctypes.data, None if g is None else g.ctypes.data, threads,
                    window_ms * 1e6, solo.ctypes.data)
        return solo.tolist(), entered
    return run


def test_contended_passes_go_solo_for_a_while(replay):
    solo, entered = replay([10.0] * 45, [5.0] * 45)  # half of every pass spent waiting
    # a 50 ms window of workers, 100 ms alone, the workers again for a window, 200 ms alone, a window ...
    assert solo == [0] * 5 + [1] * 10 + [0] * 5 + [1] * 20 + [0] * 5 and entered == 3
    solo, entered = replay([10.0] * 43, [5.0] * 43, window_ms=0.0)  # each pass judged alone
    assert solo == [0] + [1] * 10 + [0] + [1] * 20 + [0] + [1] * 10 and entered == 3


def runs_of_ones(solo: list[int]) -> list[int]:
    out, n = [], 0
    for x in solo + [0]:
        if x:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def test_solo_spans_are_time_and_end_with_the_contention(replay):
    """A span is time, not passes: 58 ms forwards (BERT-base b1xs128 alone) go solo for two passes, where 32 passes
    (1.9 s) once outlasted a 0.5 s hog; the spans double while each probe window is contended (up to 1.6 s) and
    start over at 100 ms once a window is quiet."""
    solo, entered = replay([58.0] * 40, [30.0, 30.0] + [0.0] * 38)  # a hog for the first two passes
    assert solo == [0, 1, 1] + [0] * 37 and entered == 1
    solo, _ = replay([10.0] * 800, [5.0] * 800)  # contended throughout: 100, 200, 400, 800 ms, then 1.6 s each
    assert runs_of_ones(solo)[:6] == [10, 20, 40, 80, 160, 160] and max(runs_of_ones(solo)) == 160
    wait = [5.0] * 5 + [0.0] * 60 + [5.0] * 40  # contended, quiet for a while, contended again
    solo, entered = replay([10.0] * len(wait), wait)
    assert runs_of_ones(solo)[:2] == [10, 10] and entered >= 2  # the second span is 100 ms again, not 200
    # contended until the span reached 1.6 s, then a minute with no passes: the next episode starts at 100 ms
    gap = [0.0] * 400 + [60e3] + [0.0] * 99
    solo, _ = replay([10.0] * 500, [5.0] * 500, gap_ms=gap)
    assert runs_of_ones(solo[:400])[:5] == [10, 20, 40, 80, 160]
    assert runs_of_ones(solo[400:])[0] == 10 and solo[400:405] == [0] * 5


def test_quiet_or_single_thread_passes_stay_parallel(replay):
    assert replay([10.0] * 200, [3.0] * 200) == ([0] * 200, 0)  # 30% waiting: under a third
    assert replay([10.0] * 200, [9.0] * 200, threads=1) == ([0] * 200, 0)  # one thread: nothing to give up
    spike = [0.0] * 200
    spike[7] = 30.0  # one preempted pass in a 50 ms window of quiet ones: 30 of 50 ms
    solo, _ = replay([10.0] * 200, spike)
    assert sum(solo) == 10  # went solo once, for 100 ms; with a 100 ms window the same spike would not
    assert replay([10.0] * 200, spike, window_ms=100.0) == ([0] * 200, 0)

"""The shared-machine rule (kernels/solo_rule.h) of the decoder's steps and the encoder's forwards: passes whose
caller waited over a third of a window's time for preempted workers send the next 32 passes to the caller alone,
then the workers are tried again; quiet passes and one-thread passes never go solo."""
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
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_void_p]

    def run(pass_ms, wait_ms, threads=2, window_ms=50.0):
        p = np.asarray(pass_ms, np.float64) * 1e6
        w = np.asarray(wait_ms, np.float64) * 1e6
        solo = np.zeros(len(p), np.int32)
        entered = f(len(p), p.ctypes.data, w.ctypes.data, threads, window_ms * 1e6, solo.ctypes.data)
        return solo.tolist(), entered
    return run


def test_contended_passes_go_solo_for_a_while(replay):
    solo, entered = replay([10.0] * 45, [5.0] * 45)  # half of every pass spent waiting
    # a 50 ms window of workers, 32 passes alone, the workers again for a window, alone again
    assert solo[:5] == [0] * 5 and solo[5:37] == [1] * 32 and solo[37:42] == [0] * 5 and solo[42:] == [1] * 3
    assert entered == 2
    solo, entered = replay([10.0] * 43, [5.0] * 43, window_ms=0.0)  # each pass judged alone
    assert solo[0] == 0 and solo[1:33] == [1] * 32 and solo[33] == 0 and solo[34] == 1 and entered == 2


def test_quiet_or_single_thread_passes_stay_parallel(replay):
    assert replay([10.0] * 200, [3.0] * 200) == ([0] * 200, 0)  # 30% waiting: under a third
    assert replay([10.0] * 200, [9.0] * 200, threads=1) == ([0] * 200, 0)  # one thread: nothing to give up
    spike = [0.0] * 200
    spike[7] = 30.0  # one preempted pass in a 50 ms window of quiet ones: 30 of 50 ms
    solo, _ = replay([10.0] * 200, spike)
    assert sum(solo) == 32  # went solo once; with a 100 ms window the same spike would not
    assert replay([10.0] * 200, spike, window_ms=100.0) == ([0] * 200, 0)

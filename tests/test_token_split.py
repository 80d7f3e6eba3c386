"""bert_forward.c's token split follows the threads' measured speeds (token_split.h): where the cuts fall, that
they keep the bits, and that a forward's timings move the speeds."""
import ctypes

import numpy as np
import pytest

from millis.encoder.native import NativeBert
from millis.encoder.source import resolve
from millis.encoder.tasks import load_task_model
from millis.gpu.encoder import RunOptions, from_hf
from millis.kernels.native import native_isa

pytestmark = pytest.mark.skipif(not native_isa(), reason="native kernels are off")
P64 = ctypes.POINTER(ctypes.c_int64)


@pytest.fixture(scope="module")
def model():
    src = resolve("builtin:minilm")
    enc = from_hf(load_task_model(src, "embed"), "embed", src.pooling, RunOptions(dtype="fp32", fuse="torch",
                                                                                      device="cpu"))
    m = NativeBert(enc, "int8", 2)
    lib = m.lib
    lib.bert_thread_speeds.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.bert_token_cuts.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_void_p]
    saved = (ctypes.c_double * 4)()
    lib.bert_thread_speeds(4, saved, None)
    yield m
    lib.bert_thread_speeds(4, None, saved)
    lib.bert_adaptive_split(1)


def speeds(lib, values=None, n=3):
    out = (ctypes.c_double * n)()
    lib.bert_thread_speeds(n, out, None if values is None else (ctypes.c_double * n)(*values))
    return list(out)


def cuts(lib, lengths, parts, unit=4):
    start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tb = np.zeros(parts + 1, np.int64)
    lib.bert_token_cuts(int(start[-1]), len(lengths), start.ctypes.data, parts, unit, tb.ctypes.data)
    return tb.tolist()


def test_cuts_follow_the_threads_speeds(model):
    lib = model.lib
    lib.bert_adaptive_split(1)
    speeds(lib, [1.0, 1.0, 1.0])
    assert cuts(lib, [128], 2) == [0, 64, 128]
    assert cuts(lib, [60, 68], 2) == [0, 60, 128]  # the even cut moves to a sequence's end 4 tokens off
    assert cuts(lib, [30], 2) == [0, 16, 30]  # 15 -> the nearest multiple of 4 keys
    speeds(lib, [1.0, 0.5, 1.0])
    assert cuts(lib, [128], 2) == [0, 84, 128]  # 2/3 of 128 = 85.3 -> 84
    assert cuts(lib, [60, 68], 2) == [0, 84, 128]  # inside the second sequence, 24 keys in
    assert cuts(lib, [128], 3) == [0, 52, 76, 128]  # shares 2/5, 1/5, 2/5: 51.2 -> 52, 76.8 -> 76
    speeds(lib, [1.0, 1.01, 1.0])
    assert cuts(lib, [128], 2) == [0, 64, 128]  # a hair off even keeps the even cut
    lib.bert_adaptive_split(0)
    speeds(lib, [1.0, 0.5, 1.0])
    assert cuts(lib, [128], 2) == [0, 64, 128]  # off: even shares whatever was measured
    lib.bert_adaptive_split(1)


def test_uneven_cuts_keep_the_bits_and_forwards_move_the_speeds(model):
    """Any cut gives the same vectors bit for bit (a row's ops never read another row), and each token-split
    forward's part timings pull the speeds toward what the threads measured (both threads run their own part
    here, as fast as each other, so speeds set far apart come back toward each other)."""
    lib = model.lib
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 30000, (2, 72))
    mask = np.ones_like(ids)
    mask[1, 50:] = 0
    default = lib.bert_token_split(-1)
    try:
        lib.bert_token_split(0)  # always the token split
        lib.bert_adaptive_split(0)
        even = model(ids, mask)
        lib.bert_adaptive_split(1)
        for s in ([1.0, 0.5], [0.5, 2.0], [2.0, 0.5]):
            speeds(lib, s, 2)
            assert np.array_equal(model(ids, mask), even), s
        moved = False
        # a forward whose parts one thread ran alone leaves the speeds as they were: the caller when the worker woke
        # late, or up to 32 forwards in a row where the shared-machine rule (solo_rule.h) had tripped (an earlier
        # test's three threads on two cores)
        for _ in range(64):
            speeds(lib, [2.0, 0.5], 2)
            model(ids, mask)
            s0, s1 = speeds(lib, None, 2)
            if s0 < 2.0 and s1 > 0.5:
                moved = True
                break
        assert moved, (s0, s1)
    finally:
        lib.bert_token_split(default)

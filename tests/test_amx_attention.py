"""The encoder's attention in bf16 on AMX tiles (kernels/amx_attend.h, amx.c's amx_attend): one (sequence,
head) job against softmax(Q K^T) V in float64 of the same bf16 operands, in the C form every build runs, on
AVX-512 BF16 vectors (vec_attend.h, the avx512 build) and on the tile unit where the CPU and the kernel allow
it; sequence lengths around the 16-query and 32-key tiles; the rows and columns around a job's output left
alone; head sizes it does not take refused."""
import ctypes

import numpy as np
import pytest

from millis.encoder.native import to_bf16
from millis.gen.models.native_llama import KERNEL_SOURCES
from millis.kernels.native import build, init_amx, native_isa, runnable_isas

ISAS = runnable_isas() if native_isa() else ["scalar"]


def bf16_values(x: np.ndarray) -> np.ndarray:
    return (to_bf16(np.ascontiguousarray(x, np.float32)).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def reference(qkv, b, D, HD, h, scale):
    """float64 attention of head h over the kernel's bf16 operands: (q + bq) scale, k + bk, v + bv rounded to
    bf16 (its probabilities are rounded too: the tolerance below)."""
    q = bf16_values((qkv[:, h * HD:(h + 1) * HD] + b[h * HD:(h + 1) * HD]) * np.float32(scale))
    k = bf16_values(qkv[:, D + h * HD:D + (h + 1) * HD] + b[D + h * HD:D + (h + 1) * HD])
    v = bf16_values(qkv[:, 2 * D + h * HD:2 * D + (h + 1) * HD] + b[2 * D + h * HD:2 * D + (h + 1) * HD])
    s = q @ k.T
    p = np.exp(s - s.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)) @ v, np.abs(v).max()


@pytest.mark.parametrize("isa", ISAS)
def test_amx_attention_matches_reference(isa):
    lib = build("llama_step", KERNEL_SOURCES, isa)
    lib.amx_init.restype, lib.amx_init.argtypes = ctypes.c_int, [ctypes.c_int]
    f = lib.amx_attend
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + \
                 [ctypes.c_float] + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    rng = np.random.default_rng(7)
    lib.attend_vectors.restype, lib.attend_vectors.argtypes = ctypes.c_int, [ctypes.c_int]
    vectors = lib.attend_vectors(1) == 1  # the avx512 build: AVX-512 BF16 vectors (vec_attend.h) off the tile unit
    assert vectors == (isa == "avx512")
    # (tile unit, vectors): the C form, the vector form, the tile unit
    modes = [(0, 0)] + [(0, 1)] * vectors + [(1, 0)] * (lib.amx_init(1) == 1)
    try:
        for mode in modes:
            assert lib.amx_init(mode[0]) == mode[0] and lib.attend_vectors(mode[1]) == mode[1]
            for HD in (32, 64):
                heads = 3
                D = heads * HD
                for L in (1, 5, 16, 17, 31, 40, 130):
                    qkv = (rng.standard_normal((L, 3 * D)) * 2).astype(np.float32)
                    b = (rng.standard_normal(3 * D) * 0.5).astype(np.float32)
                    scale = 1 / np.sqrt(HD)
                    # the job's rows inside a wider output (ld D + 16), with a row past L: all NaN beforehand
                    out = np.full((L + 1, D + 16), np.nan, np.float32)
                    h = 1
                    args = (qkv[:, h * HD:].ctypes.data, 3 * D, D, b[h * HD:].ctypes.data, b[D + h * HD:].ctypes.data,
                            b[2 * D + h * HD:].ctypes.data, scale, L)
                    assert f(*args, 0, L, HD, out[:, h * HD:].ctypes.data, None, D + 16) == 1
                    # as bf16 rows (the bf16 matmuls' input): the fp32 results rounded, nothing else written
                    outb = np.full((L + 1, D + 16), 0xFFFF, np.uint16)
                    assert f(*args, 0, L, HD, None, outb[:, h * HD:].ctypes.data, D + 16) == 1
                    assert np.array_equal(outb[:L, h * HD:(h + 1) * HD], to_bf16(out[:L, h * HD:(h + 1) * HD]))
                    outb[:L, h * HD:(h + 1) * HD] = 0xFFFF
                    assert (outb == 0xFFFF).all(), "wrote outside the job"
                    ref, vmax = reference(qkv, b, D, HD, h, scale)
                    got = out[:L, h * HD:(h + 1) * HD]
                    assert np.abs(got - ref).max() <= 4e-3 * vmax, (mode, HD, L, np.abs(got - ref).max())
                    assert np.isnan(out[L]).all() and np.isnan(out[:, :h * HD]).all(), "wrote outside the job"
                    assert np.isnan(out[:, (h + 1) * HD:]).all(), "wrote outside the job"
                    # a range of the queries (a part of bert_forward's token split): those rows, the same bits,
                    # written from the output's first row
                    for q0, q1 in {(0, 1), (L // 2, L), (L // 3, L - L // 4), (L - 1, L)}:
                        part = np.full((L + 1, D + 16), np.nan, np.float32)
                        assert f(*args, q0, q1, HD, part[:, h * HD:].ctypes.data, None, D + 16) == 1
                        assert np.array_equal(part[:q1 - q0, h * HD:(h + 1) * HD], got[q0:q1]), (mode, HD, L, q0, q1)
                        part[:q1 - q0, h * HD:(h + 1) * HD] = np.nan
                        assert np.isnan(part).all(), "wrote outside the queries"
                    for q0, q1 in ((0, 0), (3, 2), (-1, L), (0, L + 1)):
                        assert f(*args, q0, q1, HD, out[:, h * HD:].ctypes.data, None, D + 16) == 0
            # head sizes the tiles do not take: nothing done, the caller's fp32 path runs them
            qkv = rng.standard_normal((8, 3 * 48)).astype(np.float32)
            b = np.zeros(3 * 48, np.float32)
            out = np.full((8, 48), np.nan, np.float32)
            for HD in (16, 48, 96):
                assert f(qkv.ctypes.data, 3 * 48, 48, b.ctypes.data, b.ctypes.data, b.ctypes.data, 0.1, 8, 0, 8, HD,
                         out.ctypes.data, None, 48) == 0
            assert np.isnan(out).all()
    finally:
        init_amx(lib)  # the process's own answers again
        lib.attend_vectors(1)

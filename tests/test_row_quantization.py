"""The activations' quantization for the row types (blockq.c quantize_act_smooth with one scale per token: int7-row
and int7-row-a8, what every LayerNorm, GELU and attention row of the native encoder goes through): each build
(AVX-512's 16-lane loop, AVX2's, plain C) writes numpy's reference blocks, field by field (d and q in the SIMD
builds)."""
import ctypes

import numpy as np
import pytest

from millis.gen.models.native_llama import KERNEL_SOURCES
from millis.kernels.native import TYPE_Q7_ROW, TYPE_Q7_ROW8, TYPE_Q8_ROW, build, native_isa, runnable_isas

ISAS = runnable_isas() if native_isa() else []
XBLOCK = np.dtype([("d", "<f4"), ("s", "<f4"), ("sum", "<i4"), ("q", "u1", 32), ("half", "<i2", 2)])  # 48 bytes


def reference(x: np.ndarray, inv, levels: int, off: int) -> np.ndarray:
    """blockq.c's steps in float32: x * inv, the row's largest |value|, q = round-half-even(v * levels / amax)."""
    v = x * inv if inv is not None else x
    amax = np.float32(np.abs(v).max())
    d = np.float32(amax / np.float32(levels))
    ident = np.float32(np.float32(levels) / amax) if amax > 0 else np.float32(0)
    q = np.rint(v * ident).astype(np.int32).reshape(-1, 32)
    out = np.zeros(len(q), XBLOCK)
    out["q"] = ((q + off) % 256).astype(np.uint8)
    out["sum"] = q.sum(1)
    out["half"] = np.stack([q[:, :16].sum(1), q[:, 16:].sum(1)], 1)
    out["d"] = d
    out["s"] = d * out["sum"].astype(np.float32)
    return out


def offset(isa: str, type_id: int) -> int:
    """packed.h's act_offset: the SIMD builds take the row types' activations unsigned (+ 64 / + 128), but for
    int8-row's on the avx2 build (signed, for maddubs(|w|, sign(x, w))); the scalar build signed."""
    if isa == "scalar" or (isa == "avx2" and type_id == TYPE_Q8_ROW):
        return 0
    return 64 if type_id == TYPE_Q7_ROW else 128


@pytest.mark.skipif(not ISAS, reason="native kernels are off")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type_id,levels", [(TYPE_Q7_ROW, 63), (TYPE_Q7_ROW8, 127), (TYPE_Q8_ROW, 127)])
def test_row_quantization_matches_numpy(isa, type_id, levels):
    lib = build("llama_step", KERNEL_SOURCES, isa)
    lib.quantize_act_smooth.restype = None
    lib.quantize_act_smooth.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    off = offset(isa, type_id)
    rng = np.random.default_rng(3)
    for K in (32, 384, 1536):
        for case in ("plain", "smoothed", "outlier", "zeros", "halves"):
            x = (rng.standard_normal(K) * 3).astype(np.float32)
            inv = rng.uniform(0.25, 2.0, K).astype(np.float32) if case == "smoothed" else None
            if case == "outlier":
                x[rng.integers(K)] = -250.0
            elif case == "zeros":
                x[:] = 0.0
            elif case == "halves":  # values at exactly half a level: round half to even
                x = ((rng.integers(-levels, levels, K) + 0.5) / levels).astype(np.float32)
                x[0] = 1.0
            out = np.zeros(K // 32, XBLOCK)
            lib.quantize_act_smooth(type_id, x.ctypes.data, None if inv is None else inv.ctypes.data, K,
                                    out.ctypes.data)
            want = reference(x, inv, levels, off)
            # the SIMD builds write d and q alone (blockq.c ROW_BLOCKS_DQ: their tiles read nothing else); the
            # scalar reference every field
            for field in XBLOCK.names if isa == "scalar" else ("d", "q"):
                assert np.array_equal(out[field], want[field]), (isa, type_id, K, case, field)


def row_case(lib, type_id: int, isa: str, N: int, K: int, M: int, rng, keep: list | None = None):
    """A packed row-type matrix (N, K) of random weights, M tokens' activation blocks for it, and numpy's float32
    steps of their product: float(sum_k x w) * (d_row * d_tok)."""
    from millis.encoder.native import q7_0
    from millis.kernels.native import Mat, pack_matrix

    levels = 127 if type_id == TYPE_Q8_ROW else 63
    data = q7_0(rng.standard_normal((N, K)).astype(np.float32), per_row=True, levels=levels)
    keep = [data] if keep is None else keep + [data]
    mat = pack_matrix(lib, Mat(type_id, 0, data.ctypes.data, N, K, data.nbytes // N), keep, 1)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[0] = 2.0  # a token at full scale: every pair of products at its largest (an int16 overflow would show)
    xq = np.zeros((M, K // 32), XBLOCK)
    for m in range(M):
        lib.quantize_act(type_id, x[m].ctypes.data, K, xq[m].ctypes.data)
    blocks = data.reshape(N, K // 32, 34)
    w = blocks[..., 2:].copy().view(np.int8).reshape(N, K).astype(np.int64)
    assert np.abs(w).max() == levels
    d_row = blocks[:, 0, :2].copy().view(np.float16).reshape(N).astype(np.float32)
    xs = xq["q"].reshape(M, K).astype(np.int64)
    off = offset(isa, type_id)
    xs = xs - off if off else xs.astype(np.uint8).view(np.int8).astype(np.int64)  # stored x + off, or signed
    product = (xs @ w.T).astype(np.float32) * (d_row[None, :] * xq["d"][:, :1])  # each step in float32
    return mat, xq, product, keep  # (keep: the arrays the packed matrix points into)


@pytest.mark.skipif(not ISAS, reason="native kernels are off")
@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"])
@pytest.mark.parametrize("K", [32, 384, 1600])
@pytest.mark.parametrize("N", [88, 85])
@pytest.mark.parametrize("type_id", [TYPE_Q7_ROW, TYPE_Q8_ROW])
def test_row_matmul_rounds_every_token_alike(isa, K, N, type_id):
    """int7-row and int8-row matmuls (q7r_tile / q7r_tile512; int8-row's weights in [-127, 127]: vpdpbusd, or
    maddubs(|w|, sign(x, w)) on the avx2 build), writing and adding into Y, against numpy's float32 steps:
    y (+)= float(sum_k x w) * (d_row * d_tok), the product rounded before the add. Every token of the tiles (13
    tokens: 6 + 6 + 1), every row span (88 rows: 32 + 32 + 16 + a lone 8) and K in one unit, one slab and three
    (the weight sums' offset term: one unit's, or the whole rows' that repack stores once), with the last group
    whole or cut (85 rows: its tile's values go through store_group, the others straight into Y). GCC once
    contracted the add into an FMA in some tiles, so a token's last bit depended on its place in the tile."""
    from millis.kernels.native import XBLOCK_BYTES

    assert XBLOCK.itemsize == XBLOCK_BYTES
    lib = build("llama_step", KERNEL_SOURCES, isa)
    P = ctypes.c_void_p
    lib.quantize_act.restype, lib.matmul.restype = None, None
    lib.quantize_act.argtypes = [ctypes.c_int, P, ctypes.c_int64, P]
    lib.matmul.argtypes = [P, P, P, ctypes.c_int64, P, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    M = 13
    mat, xq, product, _keep = row_case(lib, type_id, isa, N, K, M, np.random.default_rng(5))
    for acc, start in ((0, 0.0), (1, 1.5)):
        y = np.full((M, N), start, np.float32)
        lib.matmul(ctypes.addressof(mat), xq.ctypes.data, None, M, y.ctypes.data, N, acc, 1)
        want = np.float32(start) + product if acc else product
        assert np.array_equal(y, want), (isa, acc, np.argwhere(y != want)[:5])


@pytest.mark.skipif(not ISAS, reason="native kernels are off")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type_id", [TYPE_Q7_ROW, TYPE_Q7_ROW8, TYPE_Q8_ROW])
def test_more_rows_equal_two_calls(isa, type_id):
    """matmul_more (blockq.c: the native encoder's residual rows at each sequence's ends, computed in the same pass
    as the tokens': the last part tile's rows and the residual ones staged into one run of tiles on AVX-512, a pass
    of their own past 12 rows or elsewhere) gives two matmul calls' bits: the main rows written or added into Y
    (acc), the more rows written into Y2, for main counts that end in a whole tile or in part of one (1 .. 70:
    across MTILE's 64) and more counts from 1 to past the staged limit (13, 20), over every row span (88 and 85
    rows) and K in one slab or three."""
    lib = build("llama_step", KERNEL_SOURCES, isa)
    P = ctypes.c_void_p
    lib.quantize_act.restype, lib.matmul.restype, lib.matmul_more.restype = None, None, None
    lib.quantize_act.argtypes = [ctypes.c_int, P, ctypes.c_int64, P]
    lib.matmul.argtypes = [P, P, P, ctypes.c_int64, P, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.matmul_more.argtypes = [P, P, ctypes.c_int64, P, ctypes.c_int64, ctypes.c_int, P, ctypes.c_int64, P,
                                ctypes.c_int64, ctypes.c_int]
    rng = np.random.default_rng(11)
    for N, K in ((88, 1600), (85, 384)):
        mat, xq, _, _keep = row_case(lib, type_id, isa, N, K, 70, rng)
        more_q = row_case(lib, type_id, isa, N, K, 20, rng)[1]
        for M, M2 in ((1, 1), (2, 3), (6, 1), (7, 12), (8, 2), (13, 13), (64, 2), (65, 5), (70, 20)):
            for acc in (0, 1):
                want_y = np.full((M, N), 0.5, np.float32)
                want_y2 = np.zeros((M2, N), np.float32)
                lib.matmul(ctypes.addressof(mat), xq.ctypes.data, None, M, want_y.ctypes.data, N, acc, 2)
                lib.matmul(ctypes.addressof(mat), more_q.ctypes.data, None, M2, want_y2.ctypes.data, N, 0, 2)
                y = np.full((M, N), 0.5, np.float32)
                y2 = np.full((M2, N + 3), np.nan, np.float32)  # ldy2 wider than N: the rows' stride is kept
                lib.matmul_more(ctypes.addressof(mat), xq.ctypes.data, M, y.ctypes.data, N, acc, more_q.ctypes.data,
                                M2, y2.ctypes.data, N + 3, 2)
                assert np.array_equal(y, want_y), (isa, type_id, N, K, M, M2, acc)
                assert np.array_equal(y2[:, :N], want_y2), (isa, type_id, N, K, M, M2, acc)
                assert np.isnan(y2[:, N:]).all()

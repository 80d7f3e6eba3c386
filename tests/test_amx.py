"""millis's bf16 on AMX tiles (kernels/amx.c): the 16-row tile layout, the 2 x 2 tile blocking, partial
tiles of tokens and rows, and accumulation, in the C form every build runs (this machine's CI has no AMX)
and on the tile unit where the CPU and the kernel allow it; the native encoder in that layout against
HF fp32 and against the AVX bf16 kernels; the switch that turns AMX off."""
import ctypes
import itertools

import numpy as np
import pytest

from millis.encoder.native import to_bf16
from millis.gen.models.native_llama import KERNEL_SOURCES
from millis.kernels.native import (TYPE_BF16_AMX, Mat, add_amx_tiles, amx_expected, build, init_amx, native_isa,
                                   pack_matrix, runnable_isas)

ISAS = runnable_isas() if native_isa() else ["scalar"]


def as_f64(b: np.ndarray) -> np.ndarray:  # bf16 bits -> their values
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def modes(lib) -> list[int]:
    """amx_init's answers to try: the C form (0), and the tile unit (1) where it is usable here."""
    return [0, 1] if lib.amx_init(1) else [0]


@pytest.mark.parametrize("isa", ISAS)
def test_amx_matmul_matches_reference(isa):
    """Every (rows, tokens) mix of full and partial tiles: 45 and 300 rows (matmul's chunks of 16 and 48
    rows: lone 16-row groups, pairs of them, a padded last one), 1 to 40 tokens (a lone partial tile, one
    full, full + partial, two full + partial), 1 and 2 threads, written and accumulated: the sum of the
    bf16 values' products within fp32 rounding."""
    lib = build("llama_step", KERNEL_SOURCES, isa)
    lib.amx_init.restype, lib.amx_init.argtypes = ctypes.c_int, [ctypes.c_int]
    lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                   ctypes.c_int]
    rng = np.random.default_rng(3)
    try:
        for mode in modes(lib):
            assert lib.amx_init(mode) == mode
            for N, K in ((45, 96), (16, 32), (300, 64)):
                wb = to_bf16(rng.standard_normal((N, K)).astype(np.float32))
                keep: list = []
                mat = pack_matrix(lib, Mat(TYPE_BF16_AMX, 0, wb.ctypes.data, N, K, 2 * K), keep, 1)
                assert mat.packed == 1 and keep[-1].nbytes == (N + 15) // 16 * 16 * K * 2
                for M in (1, 15, 16, 17, 33, 40):
                    xb = to_bf16(rng.standard_normal((M, K)).astype(np.float32))
                    ref = as_f64(xb) @ as_f64(wb).T
                    for threads in (1, 2):
                        y = np.full((M, N), np.nan, np.float32)
                        lib.matmul(ctypes.addressof(mat), xb.ctypes.data, None, M, y.ctypes.data, N, 0, threads)
                        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (mode, N, K, M, threads)
                    base = rng.standard_normal((M, N)).astype(np.float32)
                    y = base.copy()
                    lib.matmul(ctypes.addressof(mat), xb.ctypes.data, None, M, y.ctypes.data, N, 1, 2)
                    assert np.abs(y - (base + ref)).max() <= 1e-5 * np.abs(ref).max() + 1e-6, (mode, N, K, M)
                    for acc in (0, 1):  # a row's result never depends on its batch-mates (whole tiles or not)
                        one = base[:1].copy()
                        lib.matmul(ctypes.addressof(mat), xb.ctypes.data, None, 1, one.ctypes.data, N, acc, 1)
                        full = base.copy()
                        lib.matmul(ctypes.addressof(mat), xb.ctypes.data, None, M, full.ctypes.data, N, acc, 1)
                        assert np.array_equal(one[0], full[0]), (mode, N, K, M, acc)
    finally:
        init_amx(lib)  # the process's own answer again


def test_amx_needs_the_cpu_and_can_be_switched_off(monkeypatch):
    """Without AMX-BF16 / AMX-INT8 in the CPU's flags (or with MILLIS_NO_AMX) nothing runs on tiles."""
    from millis.common.hardware import cpu_flags

    lib = build("llama_step", KERNEL_SOURCES, ISAS[0])
    if not {"amx_tile", "amx_bf16", "amx_int8"} <= cpu_flags() or ISAS[0] != "avx512":
        assert not init_amx(lib) and not amx_expected()
    monkeypatch.setenv("MILLIS_NO_AMX", "1")
    assert not init_amx(lib) and not amx_expected()
    monkeypatch.delenv("MILLIS_NO_AMX")
    assert init_amx(lib) == amx_expected() or not amx_expected()  # the kernel may still refuse the tile state


def minilm_case():
    """The real MiniLM loaded for the native encoder, 3 sequences of random tokens (two padded) and HF fp32's
    embeddings of them."""
    import torch

    import millis.encoder.native as native
    from millis.encoder.source import resolve
    from millis.encoder.tasks import load_task_model
    from millis.gpu.encoder import RunOptions, from_hf

    if native.library() is None:
        pytest.skip("native kernels are off")
    src = resolve("builtin:minilm")
    tm = load_task_model(src, "embed")
    enc = from_hf(tm, "embed", src.pooling, RunOptions(dtype="fp32", fuse="torch", device="cpu"))
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 30000, (3, 21))
    ids[:, 0] = 101
    mask = np.ones((3, 21), np.int64)
    mask[1, 9:] = 0
    mask[2, 17:] = 0
    with torch.inference_mode():
        ref = tm(torch.from_numpy(ids), torch.from_numpy(mask), torch.zeros_like(torch.from_numpy(ids))).numpy()
    return enc, ids, mask, ref


def cosine(a: np.ndarray, b: np.ndarray) -> float:  # the least of the rows'
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_native_encoder_on_amx_tiles(monkeypatch):
    """The real MiniLM's native bf16 forward with its matrices and attention in AMX tiles, its int8 forward with Q8 tiles and
    its int7-row-a8 forward with row tiles (the C form here, the tile unit on an AMX machine; attention in bf16 on
    tiles for all three) keep HF fp32's cosine (>= 0.999; 0.99 for int7-row-a8 on random tokens) and equal the AVX
    kernels' results: to fp32 rounding of different summation orders for bf16, bit for bit for the integer ones
    given the same attention. (The AVX kernels' own bf16 attention on vectors is off here: test below.)"""
    import millis.encoder.native as native

    enc, ids, mask, ref = minilm_case()
    # the process's grant first: "tiles" below run the tile unit on an AMX machine (the patched init_amx left the
    # library's flag as earlier tests had set it, so this test could run the C form on one)
    assert native.init_amx(native.library()) == amx_expected() or not amx_expected()
    monkeypatch.setattr(native, "vector_attention", lambda lib: False)
    monkeypatch.setattr(native, "init_amx", lambda lib: False)
    avx = native.NativeBert(enc, "bf16", 2)
    monkeypatch.setattr(native, "init_amx", lambda lib: True)
    tiles = native.NativeBert(enc, "bf16", 2)
    assert tiles.amx and not avx.amx and tiles.kernels.endswith("+amx")
    assert (tiles.model.attn, avx.model.attn) == (native.ATTN_BF16_TILES, native.ATTN_F32)  # bf16 attention too
    out, base = tiles(ids, mask), avx(ids, mask)
    assert out.shape == ref.shape == (3, 384)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999
    assert np.abs(out - base).max() < 2e-3
    # int8 with Q8 tiles: 16 tokens or more (all 47 here, in one flat batch) on the tiles
    assert not native.NativeBert(enc, "int8", 2).amx  # off by default (kernels.native.Q8_TILES)
    monkeypatch.setattr(native, "init_amx", lambda lib: False)
    plain = native.NativeBert(enc, "int8", 2)
    monkeypatch.setattr(native, "init_amx", lambda lib: True)
    monkeypatch.setattr(native, "on_tiles", lambda precision: True)
    tiled = native.NativeBert(enc, "int8", 2)
    first = lambda nb: native.Layer.from_address(nb.model.layers)  # noqa: E731
    assert first(tiled).inter.tiles and not first(plain).inter.tiles
    # its attention in bf16 on tiles too; the plain one set to the same attention: the matmuls' bits compared
    assert (tiled.model.attn, plain.model.attn) == (native.ATTN_BF16_TILES, native.ATTN_F32)
    plain.model.attn = native.ATTN_BF16_TILES
    out, base = tiled(ids, mask), plain(ids, mask)
    assert cosine(out, ref) >= 0.999
    if tiled.isa != "scalar":  # the block kernels' integer sums and float steps: the same bits
        assert np.array_equal(out, base)
    # int7-row-a8 and int8-row on row tiles (on by default where the tile unit is usable): whole-row sums, the same
    # bits (int8-row's residual rows at the sequences' ends, 6 here, on the tiles after the tokens')
    for precision in ("int7-row-a8", "int8-row"):
        monkeypatch.undo()
        monkeypatch.setattr(native, "vector_attention", lambda lib: False)
        monkeypatch.setattr(native, "init_amx", lambda lib: False)
        plain = native.NativeBert(enc, precision, 2)
        monkeypatch.setattr(native, "init_amx", lambda lib: True)
        tiled = native.NativeBert(enc, precision, 2)
        assert tiled.amx and first(tiled).qkv.tiles and not first(plain).qkv.tiles
        assert (tiled.model.attn, plain.model.attn) == (native.ATTN_BF16_TILES, native.ATTN_F32)
        fp32_attention = plain(ids, mask)
        plain.model.attn = native.ATTN_BF16_TILES
        out, base = tiled(ids, mask), plain(ids, mask)
        # bf16 attention's rounding moves the 7-bit rows of the attention output (cosine 0.9989 to the fp32
        # attention's result here), yet it leaves the distance to HF fp32 as it was
        assert cosine(out, ref) >= cosine(fp32_attention, ref) - 1e-3, (precision, cosine(out, ref))
        assert cosine(out, ref) >= (0.99 if precision == "int7-row-a8" else 0.998), precision
        if tiled.isa != "scalar":
            assert np.array_equal(out, base), precision


def test_a_loaded_models_kernels_never_depend_on_later_loads(monkeypatch):
    """The library's one AMX flag picks the bf16 attention's kernel (tiles or vectors): an int8 model's output moved
    (cosine 0.99987) once a bf16 model loaded and asked for the tile unit, and a load with MILLIS_NO_AMX set took
    the grant back from a bf16 model loaded before it (its tile matrices then ran their C form). Every load asks now,
    and MILLIS_NO_AMX keeps only that load's layouts off the tiles: earlier models give the same bits."""
    import millis.encoder.native as native

    enc, ids, mask, _ = minilm_case()
    int8 = native.NativeBert(enc, "int8", 2)
    before = int8(ids, mask)
    bf16 = native.NativeBert(enc, "bf16", 2)
    assert np.array_equal(int8(ids, mask), before)
    tiles_before = bf16(ids, mask)
    monkeypatch.setenv("MILLIS_NO_AMX", "1")
    off = native.NativeBert(enc, "bf16", 2)
    assert not off.amx and np.array_equal(bf16(ids, mask), tiles_before) and np.array_equal(int8(ids, mask), before)


def test_native_encoder_attention_on_bf16_vectors(monkeypatch):
    """Off the tile unit the avx512 build runs the bf16 attention on AVX-512 BF16 vectors (vec_attend.h) for the
    precisions below fp32 (encoder.native.bf16_attention), and fp32 keeps fp32 attention. The real MiniLM's int8 and
    int7-row-a8 forwards with it keep their cosine to HF fp32 as with fp32 attention (within 1e-3), and equal the
    C form of the same attention to its rounding (cosine >= 0.9998 for int8, 0.999 for int7-row-a8: the vectors sum
    the softmax in their own order, and the 8-bit activations of the next matrices turn a last-bit difference into a
    quantization step now and then; 0.99989 and 0.99990 on Zen 4. Sapphire Rapids' `vdpbf16ps` adds the odd pair's
    product to the sum before the even one's (each rounded; every one of 320,000 random lanes, ad hoc), so its
    lanes differ from the C form's more often: 0.99986 and 0.99949 there, each as near HF fp32 as the C form)."""
    import millis.encoder.native as native

    enc, ids, mask, ref = minilm_case()
    monkeypatch.setattr(native, "init_amx", lambda lib: False)
    lib = native.library()
    vectors = native.vector_attention(lib)
    assert vectors == (native_isa() == "avx512")
    assert native.NativeBert(enc, "fp32", 2).model.attn == native.ATTN_F32
    assert native.NativeBert(enc, "int8-a16", 2).model.attn == native.ATTN_F32
    if not vectors:
        assert native.NativeBert(enc, "int8", 2).model.attn == native.ATTN_F32
        pytest.skip("no AVX-512 BF16 build on this CPU")
    try:
        for precision in ("int8", "int7-row-a8"):
            nb = native.NativeBert(enc, precision, 2)
            assert nb.model.attn == native.ATTN_BF16_TILES and not nb.amx
            out = nb(ids, mask)
            nb.model.attn = native.ATTN_F32
            fp32_attention = nb(ids, mask)
            nb.model.attn = native.ATTN_BF16_TILES
            assert lib.attend_vectors(0) == 0
            c_form = nb(ids, mask)
            assert lib.attend_vectors(1) == 1
            assert cosine(out, ref) >= cosine(fp32_attention, ref) - 1e-3, (precision, cosine(out, ref))
            assert cosine(out, ref) >= (0.999 if precision == "int8" else 0.99)
            assert cosine(out, c_form) >= (0.9998 if precision == "int8" else 0.999), (precision, cosine(out, c_form))
            assert not np.array_equal(out, fp32_attention)
    finally:
        lib.attend_vectors(1)


# GGUF block formats the Q8 tiles take: (ggml type id, block bytes, offsets of its fp16 scale fields)
BLOCKS = {"Q8_0": (8, 34, (0,)), "Q4_0": (2, 18, (0,)), "Q4_1": (3, 20, (0, 2)), "Q5_0": (6, 22, (0,)),
          "Q5_1": (7, 24, (0, 2)), "Q4_K": (12, 144, (0, 2)), "Q5_K": (13, 176, (0, 2))}


def random_blocks(rng, size: int, scales: tuple, rows: int, cols: int) -> np.ndarray:
    """(rows, bytes) of random blocks of a GGUF format, their fp16 scale fields set to small values (the
    second, a min's scale, negative)."""
    per_row = cols // (256 if size > 34 else 32)
    raw = rng.integers(0, 256, (rows, per_row, size), dtype=np.uint8)
    for i, off in enumerate(scales):
        vals = rng.uniform(0.002, 0.02, (rows, per_row)).astype(np.float16) * (1 if i == 0 else -1)
        raw[:, :, off:off + 2] = vals.view(np.uint8).reshape(rows, per_row, 2)
    return raw.reshape(rows, -1)


def plain_and_tiled(lib, type_id: int, raw: np.ndarray, K: int):
    """(dequantized weights, the packed matrix, the same with AMX tiles, what their structs point into) of a
    (rows, bytes) matrix of `type_id`."""
    N = raw.shape[0]
    wd = np.empty((N, K), np.float32)
    for r in range(N):
        lib.dequant_row(type_id, raw[r].ctypes.data, K, wd[r].ctypes.data)
    keep: list = [raw]
    m = Mat(type_id, 0, raw.ctypes.data, N, K, raw.shape[1])
    plain = pack_matrix(lib, m, keep, 1)
    tiled = add_amx_tiles(lib, m, plain, keep, 2)
    assert tiled.tiles and not plain.tiles
    return wd, plain, tiled, keep


def quantized(lib, type_id: int, x: np.ndarray):
    """x (M, K) as the activation blocks a `type_id` matrix takes: (M, K / 32 * 48) bytes and (M, K / 32, 48)."""
    M, K = x.shape
    xq = np.empty((M, K // 32 * 48), np.uint8)
    for i in range(M):
        lib.quantize_act(type_id, x[i].ctypes.data, K, xq[i].ctypes.data)
    return xq, xq.reshape(M, K // 32, 48)


@pytest.mark.parametrize("isa", ISAS)
def test_amx_q8_tiles_match_the_block_kernels(isa):
    """Prefill on AMX Q8 tiles (16 tokens or more): every block format they take, against the dequantized
    weights times the dequantized activation blocks (float64), and bit for bit against the SIMD builds'
    block kernels (the same integer sums and float steps: a row never depends on its batch-mates); fewer
    than 16 tokens keep the build's kernels; Q6_K and the formats whose activations carry an offset in
    this build get no tiles."""
    lib = build("llama_step", KERNEL_SOURCES, isa)
    for name, sig in (("amx_init", ([ctypes.c_int], ctypes.c_int)),
                      ("dequant_row", ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None)),
                      ("quantize_act", ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None)),
                      ("activation_offset", ([ctypes.c_int], ctypes.c_int)),
                      ("amxq_bytes", ([ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int64))):
        getattr(lib, name).argtypes, getattr(lib, name).restype = sig
    lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                   ctypes.c_int]
    assert lib.amxq_bytes(14, 16, 256) == 0  # Q6_K: scales per 16 values
    for t in (109, 111):  # Q7_0 / Q7_A7 take tiles only where their activations are signed
        assert (lib.amxq_bytes(t, 16, 64) > 0) == (lib.activation_offset(t) == 0)
    rng = np.random.default_rng(5)
    N, K = 300, 512
    try:
        for mode in modes(lib):
            assert lib.amx_init(mode) == mode
            for fmt, (type_id, size, scales) in BLOCKS.items():
                raw = random_blocks(rng, size, scales, N, K)
                wd, plain, tiled, keep = plain_and_tiled(lib, type_id, raw, K)
                assert tiled.data == plain.data
                for M in (8, 16, 17, 40):
                    xq, blocks = quantized(lib, type_id, rng.standard_normal((M, K)).astype(np.float32))
                    xd = (blocks[:, :, 12:44].view(np.int8).astype(np.float64)
                          * blocks[:, :, 0:4].copy().view(np.float32).astype(np.float64)).reshape(M, K)
                    ref = xd @ wd.astype(np.float64).T
                    ys = {}
                    for key, w in (("tiles", tiled), ("plain", plain)):
                        ys[key] = np.full((M, N), np.nan, np.float32)
                        lib.matmul(ctypes.addressof(w), xq.ctypes.data, None, M, ys[key].ctypes.data, N, 0, 2)
                        assert np.abs(ys[key] - ref).max() <= 2e-5 * np.abs(ref).max(), (mode, fmt, M, key)
                    if M < 16 or isa != "scalar":  # the block kernels' integer sums and float steps
                        assert np.array_equal(ys["tiles"], ys["plain"]), (mode, fmt, M)
                    base = rng.standard_normal((M, N)).astype(np.float32)
                    y = base.copy()
                    lib.matmul(ctypes.addressof(tiled), xq.ctypes.data, None, M, y.ctypes.data, N, 1, 1)
                    assert np.abs(y - (base + ref)).max() <= 2e-5 * np.abs(ref).max() + 1e-6, (mode, fmt, M)
    finally:
        init_amx(lib)


@pytest.mark.parametrize("isa", ISAS)
def test_amx_row_tiles_match_the_row_kernels(isa):
    """int7-row / int7-row-a8 (one scale per weight row and per token) on AMX tiles: whole-row int32 sums
    (TDPBUSD against the activations' unsigned bytes), one float step per row and token: against the
    dequantized weights times the dequantized activations (float64), and bit for bit against the SIMD builds'
    row kernels (q7r_tile512's steps); partial tiles of rows and tokens, written and accumulated; an odd count
    of blocks (the tiles take two at a time: a zero block pads the row)."""
    from millis.encoder.native import q7_0

    lib = build("llama_step", KERNEL_SOURCES, isa)
    for name, sig in (("amx_init", ([ctypes.c_int], ctypes.c_int)),
                      ("dequant_row", ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None)),
                      ("quantize_act", ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None)),
                      ("activation_offset", ([ctypes.c_int], ctypes.c_int))):
        getattr(lib, name).argtypes, getattr(lib, name).restype = sig
    lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                   ctypes.c_int]
    rng = np.random.default_rng(6)
    N = 300
    try:
        for mode, K, type_id in itertools.product(modes(lib), (384, 160), (113, 114)):  # T_Q7_ROW, T_Q7_ROW8
            assert lib.amx_init(mode) == mode
            raw = q7_0(rng.standard_normal((N, K)).astype(np.float32), per_row=True).reshape(N, -1)
            wd, plain, tiled, keep = plain_and_tiled(lib, type_id, raw, K)
            off = lib.activation_offset(type_id)
            for M in (16, 17, 40, 48):
                xq, blocks = quantized(lib, type_id, rng.standard_normal((M, K)).astype(np.float32))
                q = blocks[:, :, 12:44].astype(np.int64) - off if off else blocks[:, :, 12:44].view(np.int8)
                xd = (q.astype(np.float64) * blocks[:, :, 0:4].copy().view(np.float32)).reshape(M, K)
                ref = xd @ wd.astype(np.float64).T
                ys = {}
                for key, w in (("tiles", tiled), ("plain", plain)):
                    ys[key] = np.full((M, N), np.nan, np.float32)
                    lib.matmul(ctypes.addressof(w), xq.ctypes.data, None, M, ys[key].ctypes.data, N, 0, 2)
                    assert np.abs(ys[key] - ref).max() <= 2e-5 * np.abs(ref).max(), (mode, type_id, K, M, key)
                if isa != "scalar":  # the row kernels' integer sums and float step
                    assert np.array_equal(ys["tiles"], ys["plain"]), (mode, type_id, K, M)
                base = rng.standard_normal((M, N)).astype(np.float32)
                y = base.copy()
                lib.matmul(ctypes.addressof(tiled), xq.ctypes.data, None, M, y.ctypes.data, N, 1, 1)
                assert np.abs(y - (base + ref)).max() <= 2e-5 * np.abs(ref).max() + 1e-6, (mode, type_id, M)
    finally:
        init_amx(lib)


TSAN_DRIVER = r"""
#include <pthread.h>
#include <stdint.h>
int amx_init(int want);
int kv_packed(int HD);
static void* forward(void* arg) {  /* a forward's reads of g_amx_hw (kv_packed: the token split's choice) */
    intptr_t s = 0;
    for (int i = 0; i < 20000; i++) s += kv_packed(64);
    return (void*)s;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, forward, 0);
    for (int i = 0; i < 2000; i++) amx_init(1);  /* other models' loads */
    pthread_join(t, 0);
    return 0;
}
"""


@pytest.mark.skipif("avx512" not in ISAS, reason="g_amx_hw is read in the avx512 build (AVX-512 BF16)")
def test_amx_init_races_no_forward(tmp_path):
    """A model's load calls amx_init while another thread's forward reads g_amx_hw: it used to store 0 there, then
    maybe 1 after the kernel's grant (a forward in between took the C form), in plain stores. One atomic store of
    the answer now: the thread sanitizer finds no race between them (it reported one on g_amx_hw before)."""
    import shutil
    import subprocess

    from millis.kernels.native import HERE, ISA_FLAGS

    cc = shutil.which("gcc") or shutil.which("cc")
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if cc is None or subprocess.run([cc, "-fsanitize=thread", str(probe), "-o", str(tmp_path / "probe")],
                                    capture_output=True).returncode:
        pytest.skip("no C compiler with the thread sanitizer")
    (tmp_path / "driver.c").write_text(TSAN_DRIVER)
    sources = [HERE / f for f in ("amx.c", "pool.c", "blockq.c", "packed.c", "repack.c", "packed16.c", "packedbf16.c")]
    exe = tmp_path / "race"
    r = subprocess.run([cc, "-O3", "-fsanitize=thread", "-pthread", "-std=gnu11", *ISA_FLAGS["avx512"],
                        str(tmp_path / "driver.c"), *map(str, sources), "-o", str(exe), "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ThreadSanitizer" not in r.stderr, r.stderr[-3000:]

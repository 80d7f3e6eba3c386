"""The encoder's int8 attention (kernels/i8_attend.h, amx.c's attend_int8 and the token split's kv8_pack_quad /
kv8_attend): one (sequence, head) job against a float64 emulation of its rounding (q, k, v to int8 per token, the
probabilities times each key's value scale to 8 bits per query) and against fp32 softmax attention; sequence lengths
around the 16-query blocks and 4-key quads; rows around a job's output left alone; the packed form equal to the
job's own packing bit for bit. Then the whole encoder with it: MiniLM against HF and the bf16 attention, the token
split equal to the row split, rows independent of their batch-mates, a [CLS] head's last layer at the first tokens
alone; the avx2 and avx512 forms equal bit for bit; and the build that lacks it refuses it by name."""
import ctypes

import numpy as np
import pytest

from millis.common.errors import MillisError
from millis.encoder.native import NativeBert, library
from millis.encoder.source import Pooling, resolve
from millis.encoder.tasks import load_task_model
from millis.gpu.encoder import RunOptions, from_hf
from millis.kernels.native import native_isa
from native_checks import token_and_row_split

P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def lib_with_int8():
    lib = library() if native_isa() else None
    if lib is None:
        pytest.skip("native kernels off")
    lib.kv8_takes.restype, lib.kv8_takes.argtypes = I32, [I32]
    if not lib.kv8_takes(32):
        pytest.skip(f"the int8 attention runs on the avx512 and avx2 builds; this runs {native_isa()}")
    lib.kv8_keys_per_dword.restype, lib.kv8_keys_per_dword.argtypes = I32, []
    lib.attend_int8.restype = I32
    lib.attend_int8.argtypes = [P, I64, I64, P, P, P, ctypes.c_float] + [I32] * 4 + [P, P, I64, P, I64]
    lib.kv8_pack_quad.restype = None
    lib.kv8_pack_quad.argtypes = [P, I64, I64, P, P, I32, I32, P, P, P, P, P]
    lib.kv8_attend.restype = None
    lib.kv8_attend.argtypes = [P] * 6 + [I64, P, ctypes.c_float] + [I32] * 4 + [P, P, I64, P, I64]
    return lib


def on_build(monkeypatch, isa: str) -> None:
    """Run the test on `isa`'s build (each form of the int8 attention where the CPU runs it)."""
    from millis.kernels.native import runnable_isas

    if native_isa() is None or isa not in runnable_isas():
        pytest.skip(f"this CPU does not run the {isa} build")
    monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
    lib_with_int8()


def int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, HD) fp32 -> int8 values (as float64) and their scales amax / 127, as the kernel rounds them."""
    amax = np.abs(x).max(1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0).astype(np.float32)
    return np.rint(x * inv).astype(np.float64), (amax / np.float32(127)).astype(np.float64)


def emulate(q, k, v, scale, bias=0.0):
    """float64 of the kernel's steps over (q + bq, k + bk, v + bv): int8 operands, scores in base 2 with log2 of each
    key's value scale (and bias[q, k], MPNet's relative bias, times log2 e), 255 2^(s - max) rounded, divided by the
    sum of p / sv."""
    qi, sq = int8_rows(q)
    ki, sk = int8_rows(k)
    vi, sv = int8_rows(v)
    sv = np.maximum(sv, 1e-20)
    s = (qi @ ki.T) * (sq * scale * np.log2(np.e)) * sk.T + np.log2(sv).T + bias * np.log2(np.e)
    p = 255 * np.exp2(s - s.max(1, keepdims=True))
    return (np.rint(p) @ vi) / (p / sv.T).sum(1, keepdims=True)


def softmax_attention(q, k, v, scale, bias=0.0):
    s = (q.astype(np.float64) @ k.T) * scale + bias
    p = np.exp(s - s.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)) @ v


@pytest.mark.parametrize("rel", [False, True, "dense"], ids=["bert", "mpnet-bias", "deberta-bias"])
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("HD", [32, 64])
def test_int8_attention_matches_its_emulation_and_fp32(HD, isa, rel, monkeypatch):
    """rel: MPNet's relative bias, relb[q - k] added to query q's score of key k, from a table of the distances a
    sequence spans and 16 spare entries past each end (bert_weights.relative_bias_table's layout), the spare ones
    1e4: a key or query lane past the job's reads them, into no output (one that reached an output would swamp it).
    dense: DeBERTa's layout, relb[q + k relk]: a row of relk floats a key (queries from the job's first), the spare
    columns and rows (to 8 keys) 1e4 as well."""
    on_build(monkeypatch, isa)
    lib = lib_with_int8()
    rng = np.random.default_rng(3)
    heads, h = 3, 1
    D = heads * HD
    for L in (1, 3, 4, 5, 16, 17, 40, 129):
        table, mid, bias, relb, relk = None, 0, 0.0, None, -1
        if rel is True:  # entry mid + q - k; distances -(L - 1) .. L - 1, 16 spare entries each side (large: lanes
            # past L)
            mid = L - 1 + 16
            table = (rng.standard_normal(2 * mid + 1) * 2).astype(np.float32)
            table[:16], table[-16:] = 1e4, 1e4  # a spare entry read into an output would swamp it
            bias = table[mid + np.arange(L)[:, None] - np.arange(L)[None, :]].astype(np.float64)
            relb = table.ctypes.data + 4 * mid
        elif rel == "dense":  # bias[q, k] at row k, column q (of queries 0 .. L - 1: the job from q0 reads from q0)
            relk = (L + 15) // 16 * 16 + 16
            table = np.full(((L + 7) // 8 * 8, relk), 1e4, np.float32)
            table[:L, :L] = (rng.standard_normal((L, L)) * 2).T
            bias = table[:L, :L].T.astype(np.float64)
            relb = table.ctypes.data
        qkv = (rng.standard_normal((L, 3 * D)) * 2).astype(np.float32)
        b = (rng.standard_normal(3 * D) * 0.5).astype(np.float32)
        qkv[L // 2, 2 * D + h * HD:2 * D + (h + 1) * HD] = -b[2 * D + h * HD:2 * D + (h + 1) * HD]  # v + bv all 0
        scale = 1 / np.sqrt(HD)
        q, k, v = (qkv[:, o * D + h * HD:o * D + (h + 1) * HD] + b[o * D + h * HD:o * D + (h + 1) * HD]
                   for o in range(3))
        want, exact = emulate(q, k, v, scale, bias), softmax_attention(q, k, v, scale, bias)
        for q0, q1 in ((0, L), (L // 3, L)):
            out = np.full((L + 1, D + 16), np.nan, np.float32)  # the job's rows in a wider output, one row past
            args = (qkv[:, h * HD:].ctypes.data, 3 * D, D, b[h * HD:].ctypes.data, b[D + h * HD:].ctypes.data,
                    b[2 * D + h * HD:].ctypes.data, scale, L, q0, q1, HD, out[:, HD:].ctypes.data, None, D + 16,
                    relb, relk)
            assert lib.attend_int8(*args) == 1
            got = out[:q1 - q0, HD:2 * HD].astype(np.float64)
            top = np.abs(v).max()
            assert np.abs(got - want[q0:q1]).max() <= 4e-3 * top, (L, q0)
            assert np.abs(got - exact[q0:q1]).max() <= 6e-2 * top, (L, q0)
            assert np.isnan(out[q1 - q0:]).all() and np.isnan(out[:, :HD]).all() and np.isnan(out[:, 2 * HD:]).all()
            # the token split's form: quads packed apart (kq, scales readable to 8 keys past L), then the blocks
            Lp = (L + 7) // 8 * 8
            per = lib.kv8_keys_per_dword()  # keys a V dword holds: 4 int8 (avx512) or 2 int16 (avx2)
            kq, vq = np.zeros(Lp * HD, np.uint8), np.zeros(Lp * HD // per + HD, np.uint32)
            sc = np.zeros((3, Lp), np.float32)
            for t in range(0, L, 4):
                lib.kv8_pack_quad(qkv[t:, h * HD:].ctypes.data, 3 * D, D, b[D + h * HD:].ctypes.data,
                                  b[2 * D + h * HD:].ctypes.data, min(4, L - t), HD, kq[t * HD:].ctypes.data,
                                  vq[t // per * HD:].ctypes.data, sc[0, t:].ctypes.data, sc[1, t:].ctypes.data,
                                  sc[2, t:].ctypes.data)
            packed = np.full((L + 1, D + 16), np.nan, np.float32)
            lib.kv8_attend(kq.ctypes.data, vq.ctypes.data, sc[0].ctypes.data, sc[1].ctypes.data, sc[2].ctypes.data,
                           qkv[:, h * HD:].ctypes.data, 3 * D, b[h * HD:].ctypes.data, scale, L, q0, q1, HD,
                           packed[:, HD:].ctypes.data, None, D + 16, relb, relk)
            assert np.array_equal(packed, out, equal_nan=True), (L, q0)
    assert lib.attend_int8(qkv.ctypes.data, 3 * D, D, b.ctypes.data, b.ctypes.data, b.ctypes.data, 1.0, 4, 0, 4, 48,
                           out.ctypes.data, None, D, None, -1) == 0  # a head size it does not take


@pytest.fixture(scope="module")
def minilm():
    src = resolve("builtin:minilm")
    tm = load_task_model(src, "embed")
    return tm, from_hf(tm, "embed", src.pooling, RunOptions(dtype="fp32", fuse="torch", device="cpu"))


def batch(rng, B: int, T: int):
    """(B, T) ids from [CLS], right padding of several lengths (not multiples of 4), a hole in row 0, types 0 / 1."""
    ids = rng.integers(1000, 30000, (B, T))
    ids[:, 0] = 101
    mask = np.ones((B, T), np.int64)
    for r in range(1, B):
        mask[r, max(2, T - 7 * r):] = 0
    mask[0, T // 2] = 0
    types = np.zeros((B, T), np.int64)
    types[:, T // 3:] = 1
    return ids, mask, types


def cosine_min(a, b) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("precision", ["int7-row", "int8-row"])
def test_minilm_with_int8_attention(minilm, monkeypatch, isa, precision):
    """Against HF fp32, near the same precision with the bf16 attention; the token split (cut at quads of
    keys, at 2 and 3 threads) equal to the row split bit for bit; each row the same alone as in its batch
    (int8-row: its sequences' end rows through the int8 attention's outputs too)."""
    import torch

    on_build(monkeypatch, isa)
    tm, enc = minilm
    ids, mask, types = batch(np.random.default_rng(0), 4, 45)
    with torch.inference_mode():
        ref = tm(*(torch.from_numpy(a) for a in (ids, mask, types))).numpy()
    auto = NativeBert(enc, precision, 2)(ids, mask, types)
    for threads in (2, 3):
        model = NativeBert(enc, precision, threads, attention="int8")
        assert model.attention == "int8"
        tokens, rows = token_and_row_split(model, ids, mask, types)
        assert tokens.shape == (4, 384) and np.isfinite(tokens).all() and np.array_equal(tokens, rows), threads
    # int7-row's own rounding dominates (test_native_encoder's floor 0.988): the int8 attention adds little to it
    assert cosine_min(tokens, ref) >= max(0.988, cosine_min(auto, ref) - 0.003)
    assert not np.array_equal(tokens, auto)  # the int8 attention did run
    for r in range(4):
        n = int(mask[r].sum())
        if mask[r, :n].all():
            alone = model(ids[r:r + 1, :n], mask[r:r + 1, :n], types[r:r + 1, :n])
            assert np.array_equal(alone[0], tokens[r]), r


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_first_tokens_with_int8_attention(minilm, monkeypatch, isa):
    """A [CLS] head's last layer at the first tokens alone (first_only: that layer's keys unpacked, each job packs
    its own) equals the whole layer's rows there, in the row and the token split."""
    on_build(monkeypatch, isa)
    _, enc = minilm
    ids, mask, types = batch(np.random.default_rng(7), 5, 40)
    mask[3, 1:] = 0
    keep = mask != 0
    rows, cols = np.nonzero(keep)
    lengths = keep.sum(1)
    start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    model = NativeBert(enc, "int7-row", 2, attention="int8")
    model.pooling = Pooling("cls", normalize=True)
    default = model.lib.bert_token_split(-1)
    try:
        for split in (0, 1 << 20):
            model.lib.bert_token_split(split)
            whole = model.hidden_states(ids[rows, cols], cols, types[rows, cols], start)
            got = model(ids, mask, types)
            assert np.array_equal(got, model.head_of(whole, start, lengths, cols)), split
    finally:
        model.lib.bert_token_split(default)


def test_int8_attention_refused_by_name(minilm, monkeypatch):
    _, enc = minilm
    with pytest.raises(MillisError, match="unknown native attention 'int4'"):
        NativeBert(enc, "int7-row", 1, attention="int4")
    if native_isa() is None:
        return
    monkeypatch.setenv("MILLIS_KERNEL_ISA", "scalar")  # the build without it
    with pytest.raises(MillisError, match="int8 attention needs a SIMD build"):
        NativeBert(enc, "int7-row", 1, attention="int8")


def simd_builds() -> list[str]:
    from millis.kernels.native import runnable_isas

    isas = [i for i in runnable_isas() if i != "scalar"] if native_isa() else []
    if len(isas) < 2:
        pytest.skip(f"one SIMD build runs here ({', '.join(isas) or 'none'}): nothing to compare")
    return isas


@pytest.mark.parametrize("HD", [32, 64])
def test_builds_give_the_same_attention_bytes(monkeypatch, HD):
    """The avx2 form (i8_attend256.h: vpmaddubsw with q's signs on signed keys, vpmaddwd over int16 pairs of p and
    v, 8 queries a block) and the avx512 one (vpdpbusd, 16 queries) sum the same integers and take the same float
    steps: their outputs are equal bit for bit, by the job's packing and by the token split's, over lengths around
    both builds' blocks and quads, with keys whose values are all zero (sv floored) and scores that spread past
    2^-126 (exponents clamped)."""
    rng = np.random.default_rng(11)
    heads, h = 2, 1
    D = heads * HD
    libs = {}
    for isa in simd_builds():
        monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
        libs[isa] = lib_with_int8()
    for L in (1, 2, 5, 8, 9, 16, 33, 100):
        qkv = (rng.standard_normal((L, 3 * D)) * 2).astype(np.float32)
        qkv[:, h * HD:(h + 1) * HD] *= 40  # peaked scores: most probabilities far under 2^-126 of the largest
        b = (rng.standard_normal(3 * D) * 0.5).astype(np.float32)
        if L > 2:  # a key whose values are all zero (v + bv)
            qkv[L // 2, 2 * D + h * HD:2 * D + (h + 1) * HD] = -b[2 * D + h * HD:2 * D + (h + 1) * HD]
        q0 = L // 3
        outs = {}
        for isa, lib in libs.items():
            out = np.zeros((L, D), np.float32)
            assert lib.attend_int8(qkv[:, h * HD:].ctypes.data, 3 * D, D, b[h * HD:].ctypes.data,
                                   b[D + h * HD:].ctypes.data, b[2 * D + h * HD:].ctypes.data, 1 / np.sqrt(HD), L,
                                   q0, L, HD, out.ctypes.data, None, D, None, -1) == 1
            outs[isa] = out
        first = next(iter(outs.values()))
        assert np.isfinite(first).all() and np.abs(first[:L - q0, :HD]).max() > 0, L
        for isa, out in outs.items():
            assert np.array_equal(out, first), (isa, L)


@pytest.mark.parametrize("precision", ["int7-row", "int8-row"])
def test_builds_give_the_same_encoder_bytes(minilm, monkeypatch, precision):
    """MiniLM with the int8 attention, token split and row split, on every SIMD build: equal bit for bit."""
    _, enc = minilm
    ids, mask, types = batch(np.random.default_rng(12), 3, 70)
    outs = []
    for isa in simd_builds():
        monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
        model = NativeBert(enc, precision, 2, attention="int8")
        outs.append(token_and_row_split(model, ids, mask, types))
    for tokens, rows in outs:
        assert np.array_equal(tokens, rows) and np.array_equal(tokens, outs[0][0])

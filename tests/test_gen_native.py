"""millis's native GGUF path: the block kernels against a numpy reference (every format, the SIMD and
the scalar build, decode and GEMM shapes), the one-call forward against millis's torch Llama (itself
checked against HF transformers in test_gen_hf.py) on tiny GGUF files, the paged KV cache and its
admission, chunked prefill, the thread pool, and the real SmolLM2 against HF transformers' fp32."""
import ctypes

import numpy as np
import pytest
import torch
from gguf_fixtures import encode_tensor, random_llama_tensors, write_tiny_gguf

from millis.common.errors import MillisError
from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.kernels.native import build, native_isa, runnable_isas
from millis.gen.models import native_llama
from millis.gen.models.layers import make_batch, setup_caches
from millis.gen.models.llama import Llama
from millis.gen.models.native_llama import (INT8, KERNEL_SOURCES, TYPE_IDS, X16BLOCK_BYTES, XBLOCK_BYTES, Mat,
                                            pack_matrix)

FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
ISAS = runnable_isas() if native_isa() else ["scalar"]  # every build this CPU runs
TINY = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=256, hidden_dim=128,
                   norm_eps=1e-5, rope_theta=10000.0)
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def quantized_rows(lib, x: np.ndarray, int16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) -> (activation block bytes, the fp32 values they hold), quantized per 32 by the kernel:
    xblocks (int8, Q8_0 files) or x16blocks (int16, millis's int8)."""
    M, K = x.shape
    size, fn = (X16BLOCK_BYTES, lib.quantize_x16) if int16 else (XBLOCK_BYTES, lib.quantize_x)
    xq = np.zeros(M * (K // 32) * size, np.uint8)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    for m in range(M):
        fn(x[m].ctypes.data, K, xq.ctypes.data + m * (K // 32) * size)
    b = xq.reshape(M, K // 32, size)
    d = b[:, :, 0:4].copy().view(np.float32)
    if int16:
        q = b[:, :, 4:].copy().view(np.int16).astype(np.float32)
        assert np.abs(q).max() == 32767  # every random block reaches full scale
    else:
        q = b[:, :, 12:44].view(np.int8).astype(np.float32)
        assert (b[:, :, 8:12].copy().view(np.int32)[..., 0] == q.sum(-1)).all()  # the integer sum
    return xq, (q * d).reshape(M, K)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 7])
def test_block_matmul_matches_reference(isa, qtype, M):
    """y = W x for every format: the kernel's integer sums equal dequant(W) @ dequant(x_q) (float types:
    @ x) up to fp32 rounding; M = 1 is the decode path, 7 the 4-token GEMM tiles + rest. The SIMD
    build runs the quantized types packed (8 rows interleaved), the scalar build GGUF's layout."""
    lib = build("llama_step", KERNEL_SOURCES, isa)
    rng = np.random.default_rng(1)
    N, K = 37, 512  # not a multiple of 8 rows: the last packed group is padded
    raw, wd = encode_tensor(rng.standard_normal((N, K)).astype(np.float32), qtype, rng)
    raw = np.ascontiguousarray(raw)
    x = rng.standard_normal((M, K)).astype(np.float32)
    xq, xd = quantized_rows(lib, x)
    y = np.full((M, N), np.nan, np.float32)
    lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                   ctypes.c_int]
    keep: list = []
    mat = pack_matrix(lib, Mat(TYPE_IDS[qtype], 0, raw.ctypes.data, N, K, raw.nbytes // N), keep, 2)
    assert mat.packed == (isa != "scalar" and qtype not in ("F16", "BF16"))
    lib.matmul(ctypes.addressof(mat), xq.ctypes.data, x.ctypes.data, M, y.ctypes.data, N, 0, 2)
    ref = (x if qtype in ("F32", "F16", "BF16") else xd).astype(np.float64) @ wd.astype(np.float64).T
    assert np.abs(y - ref).max() <= 2e-5 * np.abs(ref).max(), qtype
    before = y.copy()  # accumulate: y += W x
    lib.matmul(ctypes.addressof(mat), xq.ctypes.data, x.ctypes.data, M, y.ctypes.data, N, 1, 3)
    assert np.allclose(y, 2 * before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 2, 5, 9])
def test_int8_weights_against_int16_activations(isa, M):
    """millis's int8: Q8_0 bytes x int16 activation blocks equal dequant(W) @ dequant(x16) up to fp32
    rounding (packed on SIMD builds, GGUF's layout on the scalar one), and the result sits far closer
    to the exact fp32 product than Q8_0 with int8 activations does."""
    lib = build("llama_step", KERNEL_SOURCES, isa)
    rng = np.random.default_rng(3)
    N, K = 37, 512
    raw, wd = encode_tensor(rng.standard_normal((N, K)).astype(np.float32), "Q8_0", rng)
    raw = np.ascontiguousarray(raw)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x16, xd = quantized_rows(lib, x, int16=True)
    lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                   ctypes.c_int]
    keep: list = []
    mat = pack_matrix(lib, Mat(TYPE_IDS[INT8], 0, raw.ctypes.data, N, K, raw.nbytes // N), keep, 2)
    assert mat.packed == (isa != "scalar")
    y = np.full((M, N), np.nan, np.float32)
    lib.matmul(ctypes.addressof(mat), x16.ctypes.data, x.ctypes.data, M, y.ctypes.data, N, 0, 2)
    ref = xd.astype(np.float64) @ wd.astype(np.float64).T
    assert np.abs(y - ref).max() <= 2e-5 * np.abs(ref).max()
    exact = x.astype(np.float64) @ wd.astype(np.float64).T
    _, x8 = quantized_rows(lib, x)
    assert np.abs(y - exact).max() * 50 < np.abs(x8.astype(np.float64) @ wd.astype(np.float64).T - exact).max()
    before = y.copy()
    lib.matmul(ctypes.addressof(mat), x16.ctypes.data, x.ctypes.data, M, y.ctypes.data, N, 1, 3)
    assert np.allclose(y, 2 * before, rtol=1e-6, atol=1e-6)


SIMD = [isa for isa in ISAS if isa != "scalar"]


@pytest.mark.skipif(len(SIMD) < 2, reason="needs two SIMD builds: an AVX-512 VNNI CPU runs avx512 beside avx2")
@pytest.mark.parametrize("qtype", FORMATS + (INT8,))
def test_simd_builds_agree_bitwise(qtype):
    """The avx512 build (vpdpbusd / vpdpwssd, 16- and 32-row tiles) computes every (row, token) sum the
    avx2 build does, in the same order: the same bytes, at decode (M = 1) and GEMM shapes (M = 53: F32's
    48-token passes of 12-token tiles and a 5-token rest), with 16-row pairs, 32-row quads and lone groups
    (N = 45: 6 groups, the last padded)."""
    rng = np.random.default_rng(5)
    N, K = 45, 512
    raw, _ = encode_tensor(rng.standard_normal((N, K)).astype(np.float32), "Q8_0" if qtype == INT8 else qtype, rng)
    raw = np.ascontiguousarray(raw)
    for M in (1, 4, 11, 53):
        x = rng.standard_normal((M, K)).astype(np.float32)
        got = []
        for isa in SIMD:
            lib = build("llama_step", KERNEL_SOURCES, isa)
            xq, _ = quantized_rows(lib, x, int16=qtype == INT8)
            lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                           ctypes.c_int, ctypes.c_int]
            keep: list = []
            mat = pack_matrix(lib, Mat(TYPE_IDS[qtype], 0, raw.ctypes.data, N, K, raw.nbytes // N), keep, 2)
            y = np.full((M, N), np.nan, np.float32)
            lib.matmul(ctypes.addressof(mat), xq.ctypes.data, x.ctypes.data, M, y.ctypes.data, N, 0, 1)  # one range
            got.append(y)
        assert all(np.array_equal(got[0], g) for g in got[1:]), (qtype, M)


READ_ONE, READ_QUAD, READ_SPREAD = 1, 4, 8  # blockq.h: decode_streams's modes


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FORMATS + (INT8,))
def test_decode_streams_give_the_same_bytes(isa, qtype):
    """packed.c's decode_streams: one stream per 8-row group, four adjacent groups' at once (the AVX-512 32-row
    tiles), or a chunk's groups in four runs read side by side (spread_rows), the same sums in the same order:
    the same bytes at decode (M = 1) and for a batch's 1-token rests (M = 5), over 6 groups (N = 45: runs of
    one group, two left over, the last padded) and 126 (N = 1001: matmul's chunks of 16 groups, runs of 4; the
    last chunk runs of 3 and two left over, one padded), at 1 and 2 threads, with and without the software
    prefetch (decode_prefetch: 0 or 1024 bytes ahead). The defaults follow the CPU: READ_QUAD on AMD family 26
    (Zen 5), READ_SPREAD on Intel, else READ_ONE; no prefetch on AMD family 25 with AVX-512 (Zen 4), else 1024."""
    from millis.common.hardware import cpu_family_model

    lib = build("llama_step", KERNEL_SOURCES, isa)
    for f in (lib.decode_streams, lib.decode_prefetch):
        f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int]
    lib.matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                   ctypes.c_int]
    before, before_pf = lib.decode_streams(0), lib.decode_prefetch(-1)
    family = cpu_family_model()
    assert before == (READ_QUAD if family.startswith("family 26 ") else
                      READ_SPREAD if family.startswith("family 6 ") else READ_ONE)
    assert before_pf == (0 if family.startswith("family 25 ") and isa == "avx512" else 1024)
    rng = np.random.default_rng(6)
    K = 512
    try:
        for N in (45, 1001):
            raw, wd = encode_tensor(rng.standard_normal((N, K)).astype(np.float32),
                                    "Q8_0" if qtype == INT8 else qtype, rng)
            raw = np.ascontiguousarray(raw)
            keep: list = []
            mat = pack_matrix(lib, Mat(TYPE_IDS[qtype], 0, raw.ctypes.data, N, K, raw.nbytes // N), keep, 2)
            for M in (1, 5):
                x = rng.standard_normal((M, K)).astype(np.float32)
                xq, _ = quantized_rows(lib, x, int16=qtype == INT8)
                got = []
                for streams, pf in ((READ_ONE, 0), (READ_ONE, 1024), (READ_QUAD, 0), (READ_SPREAD, 1024)):
                    assert lib.decode_streams(streams) == streams and lib.decode_prefetch(pf) == pf
                    for threads in (1, 2):
                        y = np.full((M, N), np.nan, np.float32)
                        lib.matmul(ctypes.addressof(mat), xq.ctypes.data, x.ctypes.data, M, y.ctypes.data, N, 0, threads)
                        got.append(y)
                assert np.isfinite(got[0]).all() and all(np.array_equal(got[0], g) for g in got[1:]), (qtype, N, M)
                ref = x.astype(np.float64) @ wd.astype(np.float64).T  # and they are the product
                assert np.abs(got[0] - ref).max() < 0.05 * np.abs(ref).max(), (qtype, N, M)
    finally:
        lib.decode_streams(before)
        lib.decode_prefetch(before_pf)


def test_activation_blocks_round_to_nearest():
    lib = build("llama_step", KERNEL_SOURCES, ISAS[-1])
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32) * [[1.0], [1e-3], [0.0]]
    x = x.astype(np.float32)
    _, xd = quantized_rows(lib, x)
    for b in range(2):  # each 32-block: error <= half a step of its own scale (amax / 127)
        blk, got = x[:, 32 * b:32 * b + 32], xd[:, 32 * b:32 * b + 32]
        step = np.abs(blk).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - blk) <= step / 2 + 1e-12).all()
    assert (xd[2] == 0).all()


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutes q/k rows so RoPE pairs are adjacent; HF layout is rotate_half."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def reference(cfg: LlamaConfig, ref: dict, neox: bool, max_batch: int = 2) -> Llama:
    """millis's torch Llama in fp32 from the values a GGUF stores (q/k un-permuted for llama files)."""
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in ref.items()}
    sd = {"tok_emb.weight": t["token_embd.weight"], "norm.weight": t["output_norm.weight"]}
    if "output.weight" in t:
        sd["head.weight"] = t["output.weight"]
    for i in range(cfg.n_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        q, k = t[b + "attn_q.weight"], t[b + "attn_k.weight"]
        if not neox:
            q, k = unpermute(q, cfg.n_heads), unpermute(k, cfg.n_kv_heads)
        sd[p + "attn.wqkv.weight"] = torch.cat([q, k, t[b + "attn_v.weight"]])
        if cfg.qkv_bias:
            bq, bk = t[b + "attn_q.bias"], t[b + "attn_k.bias"]
            sd[p + "attn.wqkv.bias"] = torch.cat([bq, bk, t[b + "attn_v.bias"]])
        sd[p + "attn.wo.weight"] = t[b + "attn_output.weight"]
        sd[p + "ffn.w13.weight"] = torch.cat([t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]])
        sd[p + "ffn.w2.weight"] = t[b + "ffn_down.weight"]
        sd[p + "attn_norm.weight"], sd[p + "ffn_norm.weight"] = t[b + "attn_norm.weight"], t[b + "ffn_norm.weight"]
    model = Llama(cfg)
    if cfg.tie_head:
        sd["head.weight"] = sd["tok_emb.weight"]
    model.load_state_dict(sd)
    setup_caches(model.eval(), max_batch, cfg.max_seq)
    return model


def tiny_file(tmp_path, qtype="F32", arch="llama", **over) -> tuple[str, LlamaConfig, Llama]:
    fields = {**TINY.__dict__, **over}
    if qtype.endswith("_K"):  # K-quant rows are whole 256-value super-blocks
        fields.update(dim=256, hidden_dim=256)
    if arch == "qwen2":
        fields["qkv_bias"] = True
    cfg = LlamaConfig(**fields)
    path = str(tmp_path / f"tiny-{arch}-{qtype}.gguf")
    tensors = random_llama_tensors(cfg, qtype, embed_qtype="Q8_0" if qtype != "F32" else None)
    if qtype.endswith("_K"):  # random K blocks hold weights up to ~1: small norm gains keep activations sane
        tensors = {k: (w * 0.05 if k.endswith("norm.weight") else w, q) for k, (w, q) in tensors.items()}
    ref = write_tiny_gguf(path, cfg, tensors, arch=arch)
    return path, cfg, reference(cfg, ref, neox=arch == "qwen2")


@pytest.mark.parametrize("arch,window", [("llama", 0), ("qwen2", 0), ("mistral", 5)])
def test_f32_forward_equals_torch_reference(tmp_path, arch, window):
    """F32 weights take the fp32 path: the native logits of a prefill and of decode steps in two slots
    at different positions (paged cache, sliding window) equal the torch model's up to summation order."""
    path, cfg, ref = tiny_file(tmp_path, arch=arch, sliding_window=window)
    eng = open_engine(path, EngineConfig(max_batch=2, max_seq=64, threads=2, kv_memory_mb=1))
    nat = eng.model
    assert nat.config.sliding_window == window and eng.max_seq == 64
    nat.kv.reserve(0, 40), nat.kv.reserve(1, 40)
    a, b = [int(i) for i in torch.randint(3, 320, (11,))], [5, 9, 14]
    with torch.inference_mode():
        for batch in (make_batch([a], [0], [0], window, last_only=False), make_batch([b], [0], [1], window, False),
                      make_batch([[7], [9]], [11, 3], [0, 1], window), make_batch([[8], [4]], [12, 4], [0, 1], window)):
            want, got = ref(batch), nat(batch)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_quantized_file_close_to_fp32_of_its_weights(tmp_path, qtype):
    """Quantized weights with activations quantized per 32 (llama.cpp's scheme): the logits stay close to
    the fp32 model of the same (dequantized) weights."""
    path, cfg, ref = tiny_file(tmp_path, qtype)
    eng = open_engine(path, EngineConfig(max_batch=1, max_seq=64, threads=2))
    ids = [int(i) for i in torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(3))]
    with torch.inference_mode():
        b = make_batch([ids], [0], [0], last_only=False)
        want, got = ref(b)[0], eng.logits(ids)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.995, (qtype, cos.min())


def test_engine_greedy_equals_reference_and_batch_invariant(tmp_path):
    path, cfg, ref = tiny_file(tmp_path, "Q8_0")
    eng = open_engine(path, EngineConfig(max_batch=3, max_seq=64, threads=2))
    prompts = [[1, 40, 50, 60], [1, 7], [1, 99, 98, 97, 96, 95]]
    alone = [run_all(eng, [p], GREEDY)[0] for p in prompts]
    assert run_all(eng, prompts, GREEDY) == alone  # activations quantized per token: batch-mates do not matter
    for p, got in zip(prompts, alone):  # each token is the argmax of the engine's own full-sequence logits
        seq = p + got
        assert eng.logits(seq)[len(p) - 1:-1].argmax(-1).tolist() == got
    kv = eng.kv  # every block back: free, or idle in the prefix cache
    assert eng.free_slots == 3 and kv.in_use == 0 and sum(kv.pending) == 0 and len(kv.free) + len(kv.idle) == kv.n_blocks


def test_threads_and_chunks_do_not_change_logits(tmp_path, monkeypatch):
    path, cfg, _ = tiny_file(tmp_path, "Q4_K")
    ids = [int(i) for i in torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(4))]
    one = open_engine(path, EngineConfig(max_batch=1, max_seq=64, threads=1)).logits(ids)
    eng = open_engine(path, EngineConfig(max_batch=1, max_seq=64, threads=5))
    many = eng.logits(ids)
    assert torch.equal(one, many)  # rows split differently, each row's sum is the same
    lib = eng.model.lib  # 4 shares per thread (mm_jobs.h), not one: other chunks, the same sums
    assert lib.mm_shares(0) == 1
    try:
        lib.mm_shares(4)
        shares = eng.logits(ids)
    finally:
        lib.mm_shares(1)
    assert torch.equal(shares, one)
    # the prompt prefilled in 6 calls through the cache: 7 tokens a step attend one at a time, where the whole
    # prompt's step (PREFILL_TOKENS or more) attends in runs of tokens against shared K / V loads; each value
    # gets the same operations either way
    monkeypatch.setattr(native_llama, "CHUNK", 7)
    chunked = open_engine(path, EngineConfig(max_batch=1, max_seq=64, threads=2)).logits(ids)
    assert torch.equal(chunked, one)


@pytest.mark.skipif(len(SIMD) < 2, reason="needs two SIMD builds: an AVX-512 VNNI CPU runs avx512 beside avx2")
@pytest.mark.parametrize("qtype", ["F32", "Q4_K"])
def test_simd_builds_give_the_same_logits(tmp_path, qtype, monkeypatch):
    """The whole forward (matmuls, attention over 8-position chunks and rests, norms, RoPE) in the avx512
    build does each value's operations of the avx2 build: the same logits bit for bit at every position of a
    45-token prompt."""
    path, cfg, _ = tiny_file(tmp_path, qtype)
    ids = [int(i) for i in torch.randint(3, 320, (45,), generator=torch.Generator().manual_seed(4))]
    monkeypatch.setenv("MILLIS_NO_AMX", "1")  # the tile unit's bf16 / int8 paths are test_amx's
    got = []
    for isa in SIMD:
        monkeypatch.setenv("MILLIS_KERNEL_ISA", isa)
        eng = open_engine(path, EngineConfig(max_batch=1, max_seq=64, threads=2))
        assert eng.model.isa == isa
        got.append(eng.logits(ids))
    assert all(torch.equal(got[0], g) for g in got[1:])


def test_kv_cache_is_sized_by_memory_and_admission_waits(tmp_path):
    path, cfg, _ = tiny_file(tmp_path)
    per_token = native_llama.kv_bytes_per_token(cfg)  # 2 layers x 2 kv heads x 16 x 2 x 4 bytes = 512
    eng = open_engine(path, EngineConfig(max_batch=4, max_seq=256, threads=1, kv_memory_mb=1))
    kv = eng.kv
    assert kv.n_blocks == (1 << 20) // (per_token * kv.block_size) and kv.capacity == kv.n_blocks * kv.block_size
    small = open_engine(path, EngineConfig(max_batch=4, max_seq=256, threads=1, kv_memory_mb=1))
    small.kv.n_blocks, small.kv.free = 3, [2, 1, 0]  # 96 positions in all
    with pytest.raises(MillisError, match="KV cache holds 96 positions"):
        small.add(list(range(3, 103)))
    a = small.add([5] * 40, SamplingParams(max_tokens=20, ignore_eos=True))  # 60 positions: 2 blocks
    b = small.add([6] * 40, SamplingParams(max_tokens=20, ignore_eos=True))  # waits: 1 block left
    small.step()
    assert small.requests[a].slot >= 0 and small.requests[b].slot < 0 and list(small.waiting)[0].id == b
    while small.has_work:
        small.step()
    assert small.kv.in_use == 0 and sum(small.kv.pending) == 0 and sorted(small.kv.free + list(small.kv.idle)) == [0, 1, 2]
    long = small.add([7] * 50, SamplingParams(max_tokens=500, ignore_eos=True))  # capped by the pool: "length"
    outs = [o for _ in range(200) if small.has_work for o in small.step()]
    assert outs[-1].finished == "length" and sum(len(o.token_ids) for o in outs) == 96 - 50
    assert long not in small.requests


def test_int8_requantizes_float_matrices(tmp_path):
    """--quant int8 on a float file: every matrix as millis's int8 (int16 activations); on a file of
    another block format: refused, naming the tensor."""
    path, cfg, ref = tiny_file(tmp_path)
    eng = open_engine(path, EngineConfig(max_batch=1, max_seq=64, quant="int8"))
    assert eng.model.layers[0].q.type == TYPE_IDS[INT8] and eng.model.m.head.type == TYPE_IDS[INT8]
    assert eng.model.m.act == 1
    ids = [1, 30, 40, 50, 60, 70, 80]
    with torch.inference_mode():
        want = ref(make_batch([ids], [0], [0], last_only=False))[0]
    cos = torch.nn.functional.cosine_similarity(eng.logits(ids), want, dim=-1)
    assert cos.min() > 0.995
    q4, _, _ = tiny_file(tmp_path, "Q4_0")
    with pytest.raises(MillisError, match="is Q4_0 already"):
        open_engine(q4, EngineConfig(max_batch=1, max_seq=64, quant="int8"))


def test_errors_name_the_problem(tmp_path):
    path, cfg, _ = tiny_file(tmp_path)
    with pytest.raises(MillisError, match="GGUF"):
        open_engine(path, EngineConfig(dtype="bf16"))
    eng = open_engine(path, EngineConfig(max_batch=1, max_seq=64))
    with pytest.raises(MillisError, match="token ids"):
        eng.model.forward_flat(np.array([999]), np.array([0]), np.array([0]), np.array([0]))
    # each read outside the C scratch or block table, or ran another token (the int32 cast of 2**32 + 7 is 7)
    for ids, slots, rows in (([2**32 + 7], [0], [0]), ([5], [-1], [0]), ([5], [1], [0]), ([5, 6], [0, 0], [2]),
                             ([5], [0], [0, 0]), ([5], [0], [-1])):
        with pytest.raises(MillisError, match="forward_flat: token ids in 0.."):
            eng.model.forward_flat(np.array(ids), np.arange(len(ids)), np.array(slots), np.array(rows))
    with pytest.raises(MillisError, match="has no tensor"):
        native_llama.NativeLlama(cfg, {}, False, 1, 64, 1 << 20, 1)



def test_smollm2_matches_hf_transformers(smollm2):
    """The real model: logits on a chat prompt and 256 tokens of Shakespeare against HF transformers'
    fp32 model of the same GGUF (dequantized). The only difference is activations quantized per 32
    (as llama.cpp), so: top-1 agreement >= 90% and perplexity within 1.5%."""
    from pathlib import Path

    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from conftest import shared_models_dir

    shakespeare = shared_models_dir().parent / "data" / "tinyshakespeare" / "input.txt"
    if not shakespeare.is_file():
        pytest.skip(f"{shakespeare} is absent")
    p = Path(smollm2)
    eng = open_engine(smollm2, EngineConfig(max_batch=1, max_seq=512, threads=2))
    text = shakespeare.read_text()[-3000:]
    ids = eng.tok.encode(text)[:256]
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    got = eng.logits(ids)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(ids[1:]))  # noqa: E731
    assert agree >= 0.9 and abs(float(nll(got).exp() / nll(want).exp()) - 1) < 0.015, (agree, nll(got), nll(want))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K"])
def test_prefill_on_amx_tiles_keeps_the_logits(tmp_path, qtype, monkeypatch):
    """With AMX Q8 tiles beside the packed weights (the C form of amx.c here, the tile unit on an AMX
    machine), prefills of 24 and 40 tokens (partial tiles of tokens) give the block kernels' logits bit
    for bit."""
    from millis.gen.models import native_llama

    path, cfg, _ = tiny_file(tmp_path, qtype)
    ids = [int(i) for i in torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(4))]
    outs = []
    for amx in (False, True):
        monkeypatch.setattr(native_llama, "q8_tiles", lambda lib, on=amx: on)
        eng = open_engine(path, EngineConfig(max_batch=1, max_seq=64, threads=2))
        assert bool(eng.model.layers[0].q.tiles) == amx and bool(eng.model.layers[0].down.tiles) == amx
        outs.append((eng.logits(ids[:24]), eng.logits(ids)))
    for plain, tiled in zip(*outs):  # the block kernels' integer sums and float steps: the same bits
        assert plain.shape == tiled.shape
        if eng.model.isa == "scalar":  # the scalar build's reference sums blocks in another order
            assert (tiled - plain).abs().max() <= 5e-3 * plain.abs().max()
        else:
            assert torch.equal(plain, tiled)

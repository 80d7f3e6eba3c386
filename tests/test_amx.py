"""millis's bf16 on AMX tiles (kernels/amx.c): the 16-row tile layout, the 2 x 2 tile blocking, partial
tiles of tokens and rows, and accumulation, in the C form every build runs (this machine's CI has no AMX)
and on the tile unit where the CPU and the kernel allow it; the native encoder in that layout against
HF fp32 and against the AVX bf16 kernels; the switch that turns AMX off."""
import ctypes

import numpy as np
import pytest

from millis.encoder.native import to_bf16
from millis.gen.models.native_llama import KERNEL_SOURCES
from millis.kernels.native import (TYPE_BF16_AMX, Mat, amx_expected, build, init_amx, native_isa, pack_matrix,
                                   runnable_isas)

ISAS = runnable_isas() if native_isa() else ["scalar"]


def as_f64(b: np.ndarray) -> np.ndarray:  # bf16 bits -> their values
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def modes(lib) -> list[int]:
    """amx_init's answers to try: the C form (0), and the tile unit (1) where it is usable here."""
    return [0, 1] if lib.amx_init(1) else [0]


@pytest.mark.parametrize("isa", ISAS)
def test_amx_matmul_matches_reference(isa):
    """Every (rows, tokens) mix of full and partial tiles: 45 and 300 rows (matmul's chunks of 16 and 48
    rows: lone 16-row groups, pairs of them, a padded last one), 1 to 40 tokens (a lone partial tile, one full, full + partial, two full + partial), 1 and 2
    threads, written and accumulated: the sum of the bf16 values' products within fp32 rounding."""
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
                assert mat.packed == 1 and keep[0].nbytes == (N + 15) // 16 * 16 * K * 2
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
    finally:
        init_amx(lib)  # the process's own answer again


def test_amx_needs_the_cpu_and_can_be_switched_off(monkeypatch):
    """Without AMX-BF16 in the CPU's flags (or with MILLIS_NO_AMX) bf16 stays on the AVX kernels."""
    from millis.common.hardware import cpu_flags

    lib = build("llama_step", KERNEL_SOURCES, ISAS[0])
    if not {"amx_tile", "amx_bf16"} <= cpu_flags() or ISAS[0] != "avx512":
        assert not init_amx(lib) and not amx_expected()
    monkeypatch.setenv("MILLIS_NO_AMX", "1")
    assert not init_amx(lib) and not amx_expected()
    monkeypatch.delenv("MILLIS_NO_AMX")
    assert init_amx(lib) == amx_expected() or not amx_expected()  # the kernel may still refuse the tile state


def test_native_encoder_in_the_amx_layout(monkeypatch):
    """The real MiniLM's native bf16 forward with its matrices in AMX tiles (the C form here, the tile unit
    on an AMX machine) keeps HF fp32's cosine >= 0.999 and equals the AVX bf16 kernels' result to fp32
    rounding of different summation orders."""
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
    import torch

    with torch.inference_mode():
        ref = tm(torch.from_numpy(ids), torch.from_numpy(mask), torch.zeros_like(torch.from_numpy(ids))).numpy()
    monkeypatch.setattr(native, "init_amx", lambda lib: False)
    avx = native.NativeBert(enc, "bf16", 2)
    monkeypatch.setattr(native, "init_amx", lambda lib: True)
    tiles = native.NativeBert(enc, "bf16", 2)
    assert tiles.amx and not avx.amx and tiles.kernels.endswith("+amx")
    out, base = tiles(ids, mask), avx(ids, mask)
    assert out.shape == ref.shape == (3, 384)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999
    assert np.abs(out - base).max() < 2e-3

"""Smoothing for the native row precisions (int7-row, int7-row-a8), as SmoothQuant (Xiao et al., 2023) does it.

One activation scale per token lets a few outlier channels (MiniLM's LayerNorm outputs and GELU rows) set
the step of every other channel. Per input channel j of each matrix, s_j = amax_x(j)^ALPHA / amax_w(j)^(1 -
ALPHA): the kernels quantize x / s against weights stored as W * s, the same product in exact arithmetic,
with the outliers' range moved into the weights (whose scale is per row). ALPHA 0.5 is SmoothQuant's default;
an fp32 emulation on MiniLM agreed (best of 0.4-0.85; cosine min to fp32 0.9917 -> 0.9959 with 8-bit
activations per token, 0.9854 -> 0.9914 with 7-bit ones). That emulation read 512 Banking77 *test* texts,
the split the benches report on: a look at the report split, said here; the calibration size below was
chosen on train texts.

amax_x comes from a data-free calibration: the fp32 model on CALIBRATION random token ids (seeded, so a
variant loads to the same bytes every time; outlier channels are a property of the weights, not of the
text: Banking77 train texts gave 0.9965 against the random ids' 0.9959 in the same emulation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from millis.common.errors import MillisError

ALPHA = 0.5
# int8-row (8-bit weights a row, the sequences' ends with a residual row): chosen on Banking77 *train* texts (the
# 204 of <= 4 words, and 300 others), int8-row's cosine to fp32 over alpha 0.25-0.6: mean 0.99930 / 0.99936 /
# 0.99937 / 0.99941 / 0.99936 / 0.99931 / 0.99900 on the short ones, the best at 0.4 (mins 0.9966-0.9978 from
# 0.25 to 0.5, 0.9951 at 0.6)
ALPHAS = {"int8-row": 0.4}


def alpha_for(precision: str) -> float:
    """The smoothing's migration strength for a row precision."""
    return ALPHAS.get(precision, ALPHA)
CALIBRATION = (32, 64)  # sequences x tokens of random ids (on Banking77 train texts, int7-row-a8's
#                         cosine min: 0.9929 at 8 x 64, 0.9952 at 16 x 64, 0.9953 here)
FLOOR = 1e-5           # amax floor: a dead channel or a zero weight column keeps a finite scale


def input_amax(encoder) -> list[dict[str, np.ndarray]]:
    """Per layer, the largest |x| per input channel of each GEMM (qkv, o, inter, down) on random token ids."""
    from functools import partial

    import torch

    c = encoder.cfg
    B, T = CALIBRATION[0], min(CALIBRATION[1], c.max_positions)
    low = 1000 if c.vocab > 2000 else 0  # past BERT vocabularies' special and unused tokens
    ids = torch.randint(low, c.vocab, (B, T), generator=torch.Generator().manual_seed(0))
    index = {id(lw): i for i, lw in enumerate(encoder.layers)}
    stats: list[dict[str, np.ndarray]] = [{} for _ in encoder.layers]

    def observe(lw, name: str, x: torch.Tensor) -> None:
        a = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0).numpy()
        seen = stats[index[id(lw)]]
        seen[name] = np.maximum(seen[name], a) if name in seen else a

    layer = encoder.layer  # millis.gpu.encoder.layer_forward (its `observe` hook sees each GEMM's input)
    if c.prenorm or c.disentangled:  # ModernBERT's and DeBERTa's forwards (millis.gpu.prenorm, .deberta) read it here
        encoder.observe = observe
    else:
        encoder.layer = partial(layer, observe=observe)
    try:
        with torch.no_grad():
            encoder(ids, torch.ones_like(ids), torch.zeros_like(ids))
    finally:
        encoder.layer, encoder.observe = layer, None
    return stats


AMAX_FILE = "smoothing_amax.npz"  # beside a native variant's weights: input_amax, so a load runs no calibration
GEMMS = ("qkv", "o", "inter", "down")


def save_amax(stats: list[dict[str, np.ndarray]], d: Path, gemms: tuple[str, ...] = GEMMS) -> Path:
    """input_amax's result as d/AMAX_FILE (arrays "<layer>.<gemm>", float32; a decoder's gemms:
    millis.gen.decoder_smooth.GROUPS)."""
    path = d / AMAX_FILE
    np.savez(path, **{f"{i}.{g}": np.asarray(a[g], np.float32) for i, a in enumerate(stats) for g in gemms})
    return path


def load_amax(d: Path, layers: int, gemms: tuple[str, ...] = GEMMS) -> list[dict[str, np.ndarray]] | None:
    """save_amax's file in d for a model of `layers` layers, or None when d has none (an artifact written
    before it existed: the load calibrates)."""
    path = d / AMAX_FILE
    if not path.is_file():
        return None
    with np.load(path) as z:
        missing = [f"{i}.{g}" for i in range(layers) for g in gemms if f"{i}.{g}" not in z.files]
        if missing:
            raise MillisError(f"{path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: not "
                              f"this {layers}-layer model's calibration (of the inputs {', '.join(gemms)} a layer)")
        return [{g: z[f"{i}.{g}"] for g in gemms} for i in range(layers)]


def smoothing_scales(x_amax: np.ndarray, w: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s (K,) float32 for inputs with per-channel amax x_amax (K,) and weights w (N, K)."""
    w_amax = np.abs(w).max(axis=0)
    s = np.maximum(x_amax, FLOOR) ** alpha / np.maximum(w_amax, FLOOR) ** (1 - alpha)
    return s.astype(np.float32)

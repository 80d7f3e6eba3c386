"""The native encoder's weight bytes: bf16 bits and Q7_0 / row-scaled int7 / int8 blocks (millis.encoder.native packs
them for the C kernels; tests build reference weights with them)."""
from __future__ import annotations

import numpy as np

from millis.common.errors import MillisError


def f32(t) -> np.ndarray:
    """A weight as a float32 array: numpy (millis.encoder.bert_weights) or a torch tensor (millis.gpu.Encoder's, on
    any device)."""
    return np.asarray(t if isinstance(t, np.ndarray) else t.detach().float().cpu().numpy(), np.float32)


def to_bf16(w: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), rounded to nearest even (packedbf16.c's bf16_rne: a NaN stays one, quiet)."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, (u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def q7_0(w: np.ndarray, per_row: bool = False, levels: int = 63) -> np.ndarray:
    """(rows, cols) fp32 -> Q7_0 bytes (rows, cols / 32 * 34): per 32 values an fp16 scale d = amax / 63 and
    32 int8 in [-63, 63] (round to nearest), Q8_0's block layout. per_row: amax over the whole row, so every
    block of a row has the same d (T_Q7_ROW). levels 127: int8-row's weights (T_Q8_ROW), in [-127, 127]."""
    rows, cols = w.shape
    if cols % 32:
        raise MillisError(f"a Q7_0 matrix needs a multiple of 32 columns, not {cols}")
    b = w.reshape(rows, cols // 32, 32).astype(np.float32)
    amax = np.abs(b).max((-2, -1) if per_row else -1, keepdims=True)
    d = amax / float(levels)
    q = np.clip(np.rint(np.divide(b, d, out=np.zeros_like(b), where=d > 0)), -levels, levels).astype(np.int8)
    out = np.empty((rows, cols // 32, 34), np.uint8)
    out[..., :2], out[..., 2:] = d.astype(np.float16).view(np.uint8), q.view(np.uint8)
    return out.reshape(rows, -1)

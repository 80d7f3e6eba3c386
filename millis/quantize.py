"""Stage 3: INT8 quantization of an ONNX graph with ONNX Runtime's quantizer.

dynamic: weights int8 offline, activations quantized per call (MatMulInteger / DynamicQuantizeMatMul).
static:  QDQ graph with activation ranges calibrated on real texts (MinMax / Percentile / Entropy).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from millis.errors import MillisError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
            "QLinearMatMul", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm")


def dynamic(in_path: Path, out_path: Path, per_channel: bool, op_types: tuple[str, ...] = ("MatMul", "Attention")) -> None:
    """op_types=("Attention",) quantizes only the fused QKV projections: on AVX2 CPUs (no VNNI) the
    FFN and output MatMuls are where int8 error accumulates on real checkpoints (MiniLM cosine
    0.986 with all MatMuls per-channel, 0.998 with attention only; notes/cpu_recipe_study.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    # DefaultTensorType: fused contrib ops (Attention...) have no ONNX type inference.
    quantize_dynamic(str(in_path), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=list(op_types),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


class _Feeds:
    """CalibrationDataReader over pre-tokenized batches (dicts of int64 arrays)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def static(in_path: Path, out_path: Path, batches: Iterable[dict[str, np.ndarray]], method: str = "minmax",
           per_channel: bool = True, op_types: tuple[str, ...] = ("MatMul",)) -> None:
    """QDQ static int8: calibrate activation ranges on `batches`, quantize `op_types` only."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise MillisError(f"unknown calibration method {method!r}; supported: {', '.join(CALIBRATION_METHODS)}")
    batches = list(batches)
    if not batches:
        raise MillisError("static quantization needs calibration texts; none were given")
    logging.getLogger().setLevel(logging.ERROR)
    # Without shape pre-processing the quantizer cannot type the activations of fused contrib ops and
    # silently quantizes none of them (the result is weight-only). Pre-process into a temp file.
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    quant_pre_process(str(in_path), str(pre), skip_optimization=True, auto_merge=True)
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    try:
        quantize_static(str(pre), str(out_path), _Feeds(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        calibrate_method=cm, op_types_to_quantize=list(op_types),
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                       "CalibMovingAverage": method == "minmax"})
    finally:
        pre.unlink(missing_ok=True)

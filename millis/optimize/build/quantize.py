"""Stage 3: INT8 quantization of an ONNX graph with ONNX Runtime's quantizer.

dynamic: weights int8 offline, activations quantized per call (MatMulInteger / DynamicQuantizeMatMul).
static:  QDQ graph with activation ranges calibrated on real texts (MinMax / Percentile / Entropy).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from millis.common.errors import MillisError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def dynamic(in_path: Path, out_path: Path, per_channel: bool, op_types: tuple[str, ...] = ("MatMul", "Attention"),
            exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> None:
    """Quantize `op_types` nodes, except the named `exclude` nodes (kept fp32); `only` limits it to
    the named nodes (sensitivity analysis quantizes one node at a time).

    op_types=("Attention",) quantizes only the fused QKV projections: on AVX2 CPUs (no VNNI) the
    FFN and output MatMuls are where int8 error accumulates on real checkpoints (MiniLM cosine
    0.986 with all MatMuls per-channel, 0.998 with attention only; notes/cpu_recipe_study.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from millis.optimize.build.graph import external, weights_file

    logging.getLogger().setLevel(logging.ERROR)
    weights_file(out_path).unlink(missing_ok=True)  # (ONNX appends to an existing one: a graph rewritten in place grew)
    # DefaultTensorType: fused contrib ops (Attention...) have no ONNX type inference.
    quantize_dynamic(str(in_path), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=list(op_types), nodes_to_exclude=list(exclude),
                     nodes_to_quantize=list(only) or None, use_external_data_format=external(in_path),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


class _Feeds:
    """CalibrationDataReader over pre-tokenized batches (dicts of int64 arrays)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def quantizable_nodes(path: Path, op_types: tuple[str, ...] = ("MatMul", "Attention")) -> list[str]:
    """Names of `op_types` nodes whose second input (the weight) is a constant: what int8 touches.

    Dynamic quantization first rewrites a plain Gemm (alpha = beta = 1, no transA; the pooler and the
    classifier head) into a MatMul named `<gemm>_MatMul` and quantizes it: listed under that name,
    which `dynamic(exclude=..., only=...)` understands."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = []
    for n in m.graph.node:
        if len(n.input) < 2 or n.input[1] not in inits:
            continue
        if n.op_type in op_types:
            names.append(n.name)
        elif n.op_type == "Gemm" and "MatMul" in op_types and n.name:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0):
                names.append(n.name + "_MatMul")
    return names


def static(in_path: Path, out_path: Path, batches: Iterable[dict[str, np.ndarray]], method: str = "minmax",
           per_channel: bool = True, op_types: tuple[str, ...] = ("MatMul",)) -> None:
    """QDQ static int8: calibrate activation ranges on `batches`, quantize `op_types` only."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from millis.optimize.build.graph import external, weights_file

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
    weights_file(out_path).unlink(missing_ok=True)
    big = external(in_path)
    quant_pre_process(str(in_path), str(pre), skip_optimization=True, auto_merge=True, save_as_external_data=big,
                      all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's histogram calibrators print to stdout
            quantize_static(str(pre), str(out_path), _Feeds(batches), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=per_channel, calibrate_method=cm, op_types_to_quantize=list(op_types),
                            use_external_data_format=big,
                            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                           "CalibMovingAverage": method == "minmax"})
    finally:
        pre.unlink(missing_ok=True)
        pre.with_name(pre.name + ".data").unlink(missing_ok=True)

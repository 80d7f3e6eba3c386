"""Open a runtime by kind: the one place that maps a recipe's `runtime` to its class."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from millis.common.errors import MillisError
from millis.runtimes.base import KINDS, Runtime, default_threads


def open_runtime(kind: str, model_dir: Path, name: str, input_names: tuple[str, ...], output_name: str,
                 options: dict[str, Any], threads: int = 0) -> Runtime:
    """Open the model file in `model_dir` with the runtime `kind` and its recipe `options`."""
    threads = threads or default_threads()
    if kind == "onnxruntime":
        from millis.runtimes.ort import OrtRuntime
        return OrtRuntime(model_dir / options.get("file", "model.onnx"), name, input_names, output_name,
                          threads, options.get("graph_level", "all"))
    if kind == "openvino":
        from millis.runtimes.openvino import OpenVinoRuntime
        # options["static"] (artifacts before dynamic shapes) is ignored: one dynamic model serves every shape
        return OpenVinoRuntime(model_dir / options.get("file", "model.xml"), name, input_names, output_name,
                               threads, options.get("precision", "f32"))
    if kind == "torch":
        from millis.runtimes.torch_eager import TorchRuntime
        return TorchRuntime(model_dir, name, input_names, output_name, threads, options["task"],
                            options.get("pooling"))
    if kind == "native":
        from millis.runtimes.native import open_native
        return open_native(model_dir, name, input_names, output_name, threads, options["task"],
                             options.get("pooling"), options.get("precision", "fp32"), options.get("attention", "auto"))
    if kind == "cuda":  # threads are irrelevant: one CUDA graph replay per call
        from millis.runtimes.cuda import CudaGraphRuntime
        return CudaGraphRuntime.from_options(model_dir, name, input_names, output_name, options)
    raise MillisError(f"unknown runtime {kind!r}; supported: {', '.join(KINDS)}")

"""ONNX Runtime CPU runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from millis.runtimes.base import check_batch

# ops that quantize their float input with one scale computed over the whole tensor at run time: every row of a
# batch shares it, so a batch-mate with larger activations changes this row's rounding (quantize_dynamic's graphs)
PER_TENSOR_DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


def has_per_tensor_dynamic_quantization(path: Path) -> bool:
    """The ONNX graph at `path` holds an op of PER_TENSOR_DYNAMIC_OPS. Every such op's name contains
    "DynamicQuantize", so a file without those bytes is settled by a scan (parsing a 400 MB model takes
    ~0.5 s and its size in memory); only one with them is parsed to look at its nodes."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(b"DynamicQuantize") < 0:
            return False
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in PER_TENSOR_DYNAMIC_OPS for n in graph.node)


class OrtRuntime:
    def __init__(self, path: Path, name: str, input_names: tuple[str, ...], output_name: str,
                 threads: int, graph_level: str = "all"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_level]
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.name, self.input_names, self.output_name = name, input_names, output_name
        self._outputs = [output_name]
        self.shares_scales_across_rows = has_per_tensor_dynamic_quantization(Path(path))

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        return {self.output_name: self.session.run(self._outputs, feeds)[0]}

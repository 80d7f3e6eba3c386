"""ONNX Runtime CPU runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from millis.runtimes.base import check_batch

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

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        return {self.output_name: self.session.run(self._outputs, feeds)[0]}

"""OpenVINO CPU runtime, optionally with static shapes.

With static=True each (B, T) seen is compiled once as a static-shape model (OpenVINO picks better
kernels and skips shape inference per call); compiled shapes are kept in a small LRU. Callers that
bucket lengths (the server, `measure`) hit a handful of shapes.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from millis.runtimes.base import check_batch

MAX_STATIC_SHAPES = 32


class OpenVinoRuntime:
    def __init__(self, path: Path, name: str, input_names: tuple[str, ...], output_name: str,
                 threads: int, precision: str = "f32", static: bool = True):
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        self.static = static
        self.name, self.input_names, self.output_name = name, input_names, output_name
        self._requests: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.effective_precision = ""  # what the CPU plugin really runs (bf16 only where the CPU has it)
        if not static:
            self._dynamic = self._compile(self.model)

    def _request(self, shape: tuple[int, int]):
        if not self.static:
            return self._dynamic
        req = self._requests.get(shape)
        if req is None:
            m = self.model.clone()
            m.reshape({n: list(shape) for n in self.input_names})
            req = self._compile(m)
            self._requests[shape] = req
            if len(self._requests) > MAX_STATIC_SHAPES:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(shape)
        return req

    def _compile(self, model):
        cm = self.core.compile_model(model, "CPU", self.config)
        hint = cm.get_property("INFERENCE_PRECISION_HINT")
        self.effective_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        return cm.create_infer_request()

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        req = self._request(feeds["input_ids"].shape)
        res = req.infer(feeds, share_inputs=True)
        return {self.output_name: np.array(res[0], dtype=np.float32, copy=True)}

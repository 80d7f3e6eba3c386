"""OpenVINO CPU runtime: one model compiled once with dynamic (batch, seq), serving every shape.

A server forms hundreds of (B, T) shapes (1..max_batch rows x 16-token buckets). Compiling each one
statically cost 0.4-2 s on its first call and ~40-70 MB per compiled shape (the LRU of 32 reached
1.25 GB). Measured on MiniLM, 2-core Zen 3 (AVX2): warm static shapes beat the dynamic model by
~1 ms at b1xs16 and by 0-3% at b1xs128, b8xs32 and b32xs32, while a new shape's first call on the
dynamic model costs about one warm call. So there is exactly one compiled model and nothing is
compiled on the request path.

Artifacts written before this carry `"static": true` in their options; it is accepted and ignored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from millis.encoder.source import STATES_NAME
from millis.runtimes.base import check_batch, masked_states


class OpenVinoRuntime:
    def __init__(self, path: Path, name: str, input_names: tuple[str, ...], output_name: str,
                 threads: int, precision: str = "f32"):
        import openvino as ov

        self.name, self.input_names, self.output_name = name, input_names, output_name
        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({n: ov.PartialShape([-1, -1]) for n in input_names})  # (B, T) both dynamic
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        compiled = core.compile_model(model, "CPU", config)  # the only compile: run() never compiles
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        # what the CPU plugin really runs (bf16 only where the CPU has it)
        self.effective_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self._request = compiled.create_infer_request()
        self._outputs = {name: o for o in compiled.outputs for name in o.get_names()}  # by each of a tensor's names
        if STATES_NAME in self._outputs:  # an embedder's graph exported with them
            self.token_states = self.graph_states  # (the Protocol's optional method: base.gives_token_states)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self._request.infer(check_batch(batch, self.input_names), share_inputs=True)
        return {self.output_name: np.array(res[self._outputs.get(self.output_name, 0)], dtype=np.float32, copy=True)}

    def graph_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, T) inputs -> (B, T, H) float32, the graph's STATES_NAME output, zeros where the mask drops a token."""
        feeds = check_batch(batch, self.input_names)
        res = self._request.infer(feeds, share_inputs=True)
        return masked_states(np.array(res[self._outputs[STATES_NAME]], dtype=np.float32), feeds["attention_mask"])

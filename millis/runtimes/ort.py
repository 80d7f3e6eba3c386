"""ONNX Runtime CPU runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from millis.common.errors import MillisError
from millis.encoder.source import STATES_NAME
from millis.runtimes.base import check_batch, masked_states

# ops that quantize their float input with one scale computed over the whole tensor at run time: every row of a
# batch shares it, so a batch-mate with larger activations changes this row's rounding (quantize_dynamic's graphs)
PER_TENSOR_DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


# ORT's fused BERT ops (the transformers optimizer's `MaskIndexEnd` format): the 2-D attention mask becomes one
# length per row, so only a mask of ones then zeros (right padding) means what it says (a left-padded row
# attended to the wrong tokens: 0.25 off on MiniLM's unit vectors)
MASK_AS_LENGTH_OPS = frozenset({"EmbedLayerNormalization", "Attention"})


def graph_traits(path: Path) -> tuple[bool, bool]:
    """(holds an op of PER_TENSOR_DYNAMIC_OPS, holds one of MASK_AS_LENGTH_OPS) for the ONNX graph at `path`.
    A file without those names' bytes is settled by a scan (parsing a 400 MB model takes ~0.5 s and its size
    in memory); only one with them is parsed to look at its nodes."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(b"DynamicQuantize") < 0 and data.find(b"EmbedLayerNormalization") < 0 and \
                data.find(b"Attention") < 0:
            return False, False
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return (any(n.op_type in PER_TENSOR_DYNAMIC_OPS for n in nodes),  # ONNX's own Attention (opset 23) reads a mask:
            any(n.op_type in MASK_AS_LENGTH_OPS and n.domain == "com.microsoft" for n in nodes))  # ORT's does not


def check_right_padded(mask: np.ndarray) -> None:
    """A mask a fused graph reads right: each row ones, then zeros."""
    if mask.ndim == 2 and mask.shape[1] > 1 and (np.diff(mask, axis=1) > 0).any():
        raise MillisError("this ONNX Runtime variant (fused attention) takes right-padded attention masks only: "
                          "each row's ones first, then its zeros")


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
        self.shares_scales_across_rows, self.mask_as_length = graph_traits(Path(path))
        if STATES_NAME in {o.name for o in self.session.get_outputs()}:  # an embedder's graph exported with them
            self.token_states = self.graph_states  # (the Protocol's optional method: base.gives_token_states)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.output_name: self.session.run(self._outputs, self.feeds(batch))[0]}

    def graph_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, T) inputs -> (B, T, H) float32, the graph's STATES_NAME output (ONNX Runtime runs only the nodes it
        needs: the pooling is skipped), zeros where the mask drops a token."""
        feeds = self.feeds(batch)
        return masked_states(self.session.run([STATES_NAME], feeds)[0], feeds["attention_mask"])

    def feeds(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        if self.mask_as_length and "attention_mask" in feeds:
            check_right_padded(feeds["attention_mask"])
        return feeds

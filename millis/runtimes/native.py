"""millis's native encoder: BERT-family models on millis's own C kernels (millis.encoder.native), in one of
its PRECISIONS: fp32, bf16, int8, int8-a16, int7, int7-a7, int7-row, int7-row-a8 or int8-row; decoder embedders on
the C decoder step (millis.gen.embedder: fp32, bf16, int8, int8-a16, int8-row).

The variant directory holds the model's fp32 weights (config.json + model.safetensors) and the smoothing's
calibration (smoothing_amax.npz, the row precisions'; an older artifact without it calibrates at load); they are
quantized and packed for this CPU's ISA at load, and the padding of a batch is never computed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from millis.encoder.source import DECODERS, Pooling, dir_pooling
from millis.kernels.native import kept_tokens
from millis.runtimes.base import check_batch


def open_native(model_dir: Path, name: str, input_names: tuple[str, ...], output_name: str, threads: int, task: str,
                pooling: dict | None = None, precision: str = "fp32", attention: str = "auto"):
    """The native runtime of a variant directory: a decoder embedder's (millis.gen.embedder), else the encoder's."""
    kind = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if kind in DECODERS:
        return NativeDecoderRuntime(model_dir, name, input_names, output_name, threads, pooling, precision, attention)
    return NativeRuntime(model_dir, name, input_names, output_name, threads, task, pooling, precision, attention)


class NativeDecoderRuntime:
    """A decoder embedder (Llama / Mistral / Qwen2 / Qwen3) on the C decoder step, pooled as its folder declares."""

    def __init__(self, model_dir: Path, name: str, input_names: tuple[str, ...], output_name: str, threads: int,
                 pooling: dict | None, precision: str, attention: str):
        from millis.gen.embedder import NativeDecoder, check_decoder_variant

        check_decoder_variant({"precision": precision, "attention": attention})
        p = Pooling(**pooling) if pooling else dir_pooling(Path(model_dir))
        self.model = NativeDecoder(Path(model_dir), precision, threads, p)
        self.name, self.input_names, self.output_name = name, input_names, output_name
        self.vocab_size = self.model.vocab

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        return {self.output_name: self.model(feeds["input_ids"], feeds["attention_mask"])}

    def token_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, T) inputs -> (B, T, D) float32: each kept token's final-norm state, zeros where the mask drops one."""
        feeds = check_batch(batch, self.input_names)
        return self.model.token_states(feeds["input_ids"], feeds["attention_mask"])


class NativeRuntime:
    def __init__(self, model_dir: Path, name: str, input_names: tuple[str, ...], output_name: str,
                 threads: int, task: str, pooling: dict | None = None, precision: str = "fp32",
                 attention: str = "auto"):
        from millis.encoder.bert_weights import load_arrays
        from millis.encoder.native import ROW_PRECISIONS, NativeBert
        from millis.encoder.smooth import load_amax

        p = Pooling(**pooling) if pooling else dir_pooling(Path(model_dir))
        weights = load_arrays(Path(model_dir), task, p)  # numpy: no torch import
        amax = load_amax(Path(model_dir), weights.cfg.layers)
        if amax is None and precision in ROW_PRECISIONS:  # an artifact from before the stored calibration: it runs
            from millis.encoder.smooth import input_amax  # here, as optimize stores it (variants.native_weights)
            from millis.gpu.encoder import RunOptions, from_hf

            amax = input_amax(from_hf(Path(model_dir), "embed", options=RunOptions(dtype="fp32", fuse="torch",
                                                                                    device="cpu")))
        self.model = NativeBert(weights, precision, threads, amax, attention)
        self.name, self.input_names, self.output_name = name, input_names, output_name
        self.vocab_size = self.model.cfg.vocab

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        out = self.model(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))
        return {self.output_name: out}

    def token_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, T) inputs -> (B, T, D) float32: each kept token's last hidden state, through the forward `run`'s
        pooling reads (bert_encode's: the kept tokens in row order, each at its column as its position); zeros
        where the mask drops a token."""
        feeds = check_batch(batch, self.input_names)
        ids, mask, types = self.model.inputs(feeds["input_ids"], feeds["attention_mask"], feeds.get("token_type_ids"))
        rows, cols, start = kept_tokens(mask)
        kept = self.model.hidden_states(ids[rows, cols], cols, np.zeros_like(cols) if types is None else
                                        types[rows, cols], start)
        out = np.zeros((*ids.shape, kept.shape[1]), np.float32)
        out[rows, cols] = kept
        return out

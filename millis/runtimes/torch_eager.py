"""Torch eager fp32: the reference every variant is compared against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from millis.runtimes.base import check_batch, masked_states


class TorchRuntime:
    def __init__(self, model_dir: Path, name: str, input_names: tuple[str, ...], output_name: str,
                 threads: int, task: str, pooling: dict | None = None):
        from dataclasses import replace

        from millis.encoder.source import Pooling, inspect_dir
        from millis.encoder.tasks import load_task_model

        torch.set_num_threads(threads)
        src = inspect_dir(model_dir)
        if pooling:  # an artifact's saved HF weights lack modules.json: the recorded pooling wins
            src = replace(src, pooling=Pooling(**pooling))
        self.model = load_task_model(src, task)
        self.name, self.input_names, self.output_name = name, input_names, output_name

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = check_batch(batch, self.input_names)
        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return {self.output_name: out.float().numpy()}

    def token_states(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, T) inputs -> (B, T, H) float32: the encoder's last_hidden_state, zeros where the mask drops a token
        (an embedder's: its bare encoder; a classifier's or SPLADE's masked LM's: the hidden states under its head)."""
        feeds = check_batch(batch, self.input_names)
        with torch.inference_mode():
            h = self.model.token_states(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return masked_states(h.float().numpy(), feeds["attention_mask"])

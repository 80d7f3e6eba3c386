"""Stage 1: export the task model to ONNX.

We use the TorchScript exporter (dynamo=False) on the HF model loaded with eager attention: that
graph is the one ONNX Runtime's transformer optimizer fuses into Attention / SkipLayerNormalization /
BiasGelu / EmbedLayerNormalization (tests count them). The dynamo exporter's graph does not fuse.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from millis.encoder.source import STATES_NAME, ModelSource
from millis.encoder.tasks import OUTPUT_NAME, load_task_model

OPSET = 17


def export(src: ModelSource, task: str, out_dir: Path) -> Path:
    """Write `model.onnx` for `task` into out_dir (dynamic batch and sequence axes; over 2 GB, its weights in
    model.onnx.data: graph.gather); return its path."""
    from millis.optimize.build.graph import gather

    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / ".export" / "model.onnx"  # torch writes a graph over 2 GB with a file per tensor beside it
    staged.parent.mkdir(exist_ok=True)
    model = load_task_model(src, task, attn="eager")
    names = list(src.input_names)
    # (B=2, T=8) dummy inputs; axes stay dynamic.
    ids = torch.full((2, 8), 5, dtype=torch.long)
    args = tuple([ids, torch.ones_like(ids)] + ([torch.zeros_like(ids)] if len(names) == 3 else []))
    out_name = OUTPUT_NAME[task]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {out_name: {0: "batch"}}
    outputs = [out_name]
    if task == "embed":  # the second output, every token's last state (ONNX Runtime computes it only when fetched)
        model.with_states = True
        outputs.append(STATES_NAME)
        axes[STATES_NAME] = {0: "batch", 1: "seq"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(staged), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return gather(staged, out_dir / "model.onnx")

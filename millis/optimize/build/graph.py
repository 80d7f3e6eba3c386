"""Stage 2: graph optimization of an exported ONNX model.

`fuse` runs ONNX Runtime's transformer optimizer offline (opt_level 0: only the transformer
fusions; the session applies its own level at load time so the file stays portable across CPUs).
`prune` drops nodes and initializers that do not reach a graph output.

A graph over protobuf's 2 GB (a decoder embedder's fp32 weights: Qwen3-Embedding-0.6B's 2.4 GB) keeps its weights
beside it in one file, `<name>.data` (`weights_file`); every pass that reads such a graph writes one the same way.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path

import onnx

from millis.encoder.source import ModelSource


def weights_file(path: Path) -> Path:
    """Where a graph over 2 GB keeps its weights: <name>.data beside it (ONNX Runtime's tools' own naming)."""
    return path.with_name(path.name + ".data")


def external(path: Path) -> bool:
    """The graph at `path` keeps its weights in `weights_file(path)`."""
    return weights_file(path).is_file()


def gather(exported: Path, path: Path) -> Path:
    """Move torch's export at `exported` (over 2 GB: a file per tensor beside it) to `path`, its weights, if outside
    the graph, in one `weights_file(path)`; the export's folder is removed."""
    import shutil

    scattered = [f for f in exported.parent.iterdir() if f != exported]
    if scattered:
        m = onnx.load(str(exported))  # with its weights
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=weights_file(path).name, size_threshold=1024)
    else:
        exported.replace(path)
    shutil.rmtree(exported.parent)
    return path


def count_ops(model: onnx.ModelProto | Path | str) -> dict[str, int]:
    m = onnx.load(str(model), load_external_data=False) if not isinstance(model, onnx.ModelProto) else model
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def prune(model: onnx.ModelProto) -> int:
    """Remove nodes whose outputs never reach a graph output; return how many were removed."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(g.node) - len(keep)
    if removed:
        del g.node[:]
        g.node.extend(reversed(keep))
    used_inits = [i for i in g.initializer if i.name in needed]
    if len(used_inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(used_inits)
    return removed


def fuse(src: ModelSource, in_path: Path, out_path: Path) -> dict[str, int]:
    """Apply transformer fusions; write out_path; return the fused graph's op counts."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # ORT's "bert" fusion set: BERT, DistilBERT, RoBERTa, XLM-R and ELECTRA get its fused Attention; MPNet's and
    # DeBERTa's relative positions and ModernBERT's rotary ones keep their attention unfused (LayerNorm, GELU fused)
    opts = FusionOptions("bert")
    opts.enable_gelu_approximation = False  # keep exact erf GELU: fidelity first
    opt = optimizer.optimize_model(str(in_path), model_type="bert", num_heads=src.num_heads,
                                   hidden_size=src.attention_size or src.hidden_size,  # pruned heads: fewer
                                   optimization_options=opts, opt_level=0)
    prune(opt.model)
    opt.save_model_to_file(str(out_path), use_external_data_format=external(in_path))
    return count_ops(opt.model)

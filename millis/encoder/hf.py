"""Hugging Face loading of encoders (`load_hf`, also for pruned shapes) and structural pruning of BERT-family
encoders: smaller weight matrices, not masks.

Three cuts, each uniform across layers so the model stays one regular shape that ONNX Runtime's
transformer fusions handle (one head count for every Attention node):
- heads: Q/K/V rows and attention-output columns of the removed heads go; the config keeps the
  head size, so a head count of k is stored as `millis_pruned: {"attention_heads": k, "head_dim": d}`
  in config.json and `load_hf` rebuilds that shape. Plain transformers cannot load such a directory
  (`from_pretrained` raises a size mismatch): transformers 5 has no `pruned_heads` any more, and BERT's
  head size is always hidden / heads;
- FFN neurons: intermediate rows and output columns go; `intermediate_size` says the new width, a
  plain HF config;
- layers: whole layers go; `num_hidden_layers` says how many are left, a plain HF config.

`masks` gives the same cuts as masks (forward hooks), which is how importance is measured and how
tests prove the structural cut changes nothing before recovery.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from millis.common.errors import MillisError

PRUNED_KEY = "millis_pruned"
PRUNABLE = ("bert", "roberta", "xlm-roberta")  # BertSelfAttention-style layers (query/key/value)


def read_pruned(path: Path) -> dict[str, int] | None:
    """The head shape recorded in `path`/config.json, or None for an unpruned model."""
    f = Path(path) / "config.json"
    return json.loads(f.read_text()).get(PRUNED_KEY) if f.is_file() else None


def encoder_layers(model) -> Any:
    """The encoder's nn.ModuleList of layers (BERT, RoBERTa, XLM-R; with or without a task head)."""
    if getattr(model.config, "model_type", "") not in PRUNABLE:
        raise MillisError(f"pruning supports {', '.join(PRUNABLE)} encoders, not {model.config.model_type!r}")
    return model.base_model.encoder.layer


def head_dim(model) -> int:
    return encoder_layers(model)[0].attention.self.attention_head_size


def num_heads(model) -> int:
    """Heads per layer as the weights have them: (Q rows) / head size."""
    return encoder_layers(model)[0].attention.self.query.out_features // head_dim(model)


def _take(linear, idx, dim: int):
    """A new nn.Linear keeping rows (dim=0: outputs) or columns (dim=1: inputs) `idx` of `linear`."""
    import torch

    idx_t = torch.as_tensor(idx, dtype=torch.long)
    w = linear.weight.detach().index_select(dim, idx_t).clone()
    out_f, in_f = w.shape
    new = torch.nn.Linear(in_f, out_f, bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach()[idx_t] if dim == 0 else linear.bias.detach())
    return new


def _uniform(keep: list[list[int]], what: str) -> int:
    counts = {len(k) for k in keep}
    if len(counts) != 1 or 0 in counts:
        raise MillisError(f"every layer must keep the same number (>= 1) of {what}, got {sorted(counts)}")
    return counts.pop()


def cut_heads(model, keep: list[list[int]]) -> None:
    """Keep heads `keep[layer]` (sorted indices) in each layer; same count in every layer. Keeping every head
    changes nothing (and writes no `millis_pruned`: the model stays a plain HF one)."""
    k, d = _uniform(keep, "attention heads"), head_dim(model)
    if k == num_heads(model):
        return
    for layer, heads in zip(encoder_layers(model), keep):
        rows = [h * d + j for h in sorted(heads) for j in range(d)]
        sa = layer.attention.self
        sa.query, sa.key, sa.value = (_take(m, rows, 0) for m in (sa.query, sa.key, sa.value))
        sa.num_attention_heads, sa.all_head_size = k, k * d  # forward views (..., -1, d): no other change
        layer.attention.output.dense = _take(layer.attention.output.dense, rows, 1)
    model.config.update({PRUNED_KEY: {"attention_heads": k, "head_dim": d}})


def cut_ffn(model, keep: list[list[int]]) -> None:
    """Keep FFN neurons `keep[layer]` in each layer; same count in every layer."""
    k = _uniform(keep, "FFN neurons")
    for layer, idx in zip(encoder_layers(model), keep):
        layer.intermediate.dense = _take(layer.intermediate.dense, sorted(idx), 0)
        layer.output.dense = _take(layer.output.dense, sorted(idx), 1)
    model.config.intermediate_size = k


def layer_list(model) -> Any:
    """The layer ModuleList of any supported encoder (DistilBERT keeps it under `transformer`, ModernBERT directly)."""
    base = model.base_model
    if hasattr(base, "encoder"):
        return base.encoder.layer
    return base.layers if hasattr(base, "layers") else base.transformer.layer


def cut_layers(model, keep: list[int]) -> None:
    """Keep encoder layers `keep` (indices, in order); works for DistilBERT and ModernBERT too (its per-layer
    attention kinds, config.layer_types, are cut with the layers)."""
    import torch

    layers = layer_list(model)
    if not keep or any(not 0 <= i < len(layers) for i in keep):
        raise MillisError(f"layers to keep must be 1..{len(layers)} indices below {len(layers)}, got {keep}")
    keep = sorted(set(keep))
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    base = model.base_model
    if hasattr(base, "encoder"):
        base.encoder.layer = kept
        model.config.num_hidden_layers = len(kept)
    elif hasattr(base, "layers"):
        if keep[0] != 0:  # its layer 0 alone has no attention norm: another first layer would reload without its own
            raise MillisError(f"a ModernBERT keeps its first layer (layer 0, the one without an attention norm); "
                              f"layers {keep} do not (--layer-map 0,...)")
        base.layers = kept
        model.config.num_hidden_layers = len(kept)
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]
    else:
        base.transformer.layer = kept
        base.transformer.n_layers = len(kept)
        model.config.n_layers = len(kept)


def _shrink_to(model, shape: dict[str, int]) -> None:
    """Give a freshly built full-size model the pruned head shape (weights are loaded after)."""
    k, d = int(shape["attention_heads"]), int(shape["head_dim"])
    keep = [list(range(k))] * len(encoder_layers(model))
    if d != head_dim(model):
        raise MillisError(f"pruned head size {d} does not match the config's {head_dim(model)}")
    cut_heads(model, keep)


# an encoder's weights (DistilBERT: transformer.; ELECTRA: embeddings_project.; ModernBERT: layers., final_norm.)
ENCODER_PARTS = ("embeddings.", "encoder.", "transformer.", "embeddings_project.", "layers.", "final_norm.")


def checked_load(path: Path, cls, **kw: Any):
    """cls.from_pretrained, its loading report read: an encoder weight the checkpoint lacks (transformers draws it at
    random, another one every load) or holds beside the class's (another architecture in a BERT config: jina-v2's
    gated MLP, ALiBi) is a one-line error naming them, as is a weight of another shape. A head (pooler, classifier)
    may be missing or left over: a task's fresh head, an MLM checkpoint's."""
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kw)
    except (RuntimeError, ValueError, OSError) as e:
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise MillisError(f"{path}: transformers cannot load it as {cls.__name__}: {why}") from None
    bad = {what: [k for k in info.get(what) or () if isinstance(k, str) and any(p in k for p in ENCODER_PARTS)
                  and not k.endswith("position_ids")] for what in ("missing_keys", "unexpected_keys")}
    bad["mismatched_keys"] = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()
                              if any(p in str(k) for p in ENCODER_PARTS)]
    if any(bad.values()):
        said = "; ".join(f"{what.split('_')[0]}: {', '.join(sorted(keys)[:4])}{' ...' if len(keys) > 4 else ''}"
                         for what, keys in bad.items() if keys)
        raise MillisError(f"{path}: its weights do not fit {type(model).__name__} of its config.json ({said}): another "
                          f"architecture under this model_type, which millis does not run")
    return model


def load_hf(path: str | Path, cls, **kw: Any):
    """`cls.from_pretrained(path, **kw)` (checked_load), also for directories whose heads were pruned by millis."""
    path = Path(path)
    shape = read_pruned(path)
    if shape is None:
        return checked_load(path, cls, **kw)
    from safetensors.torch import load_file
    from transformers import AutoConfig

    dtype = kw.pop("dtype", None)
    attn = kw.pop("attn_implementation", None)
    kw.pop("ignore_mismatched_sizes", None)
    config = AutoConfig.from_pretrained(str(path), **{k: v for k, v in kw.items() if k != "add_pooling_layer"})
    extra = {"add_pooling_layer": kw["add_pooling_layer"]} if "add_pooling_layer" in kw else {}
    model = cls.from_config(config, attn_implementation=attn, **extra) if attn else cls.from_config(config, **extra)
    _shrink_to(model, shape)
    state = load_file(str(path / "model.safetensors"))
    prefix = model.base_model_prefix + "."
    if model.base_model is model:  # a bare encoder: drop the task model's prefix
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    own = model.state_dict()
    # a new label set (fine-tuning on other classes) re-initialises the classifier, like HF does
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.startswith(("classifier", "pooler"))
               and not k.endswith("position_ids")]
    if missing:
        raise MillisError(f"{path}: weights missing for the pruned shape: {missing[:4]}")
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@contextlib.contextmanager
def masks(model, heads=None, ffn=None, skip: set[int] | frozenset = frozenset()) -> Iterator[None]:
    """Apply masks while inside: `heads` (L, H) and `ffn` (L, I) tensors multiply each head's context
    / each FFN activation (requires_grad=True ones give importance by their gradients); layers in
    `skip` pass their input through."""
    hooks = []
    d = head_dim(model)
    for i, layer in enumerate(encoder_layers(model)):
        if heads is not None:
            def head_hook(mod, args, out, m=heads[i]):
                # out[0] (B, T, H*d): scale each head's d columns
                return (out[0] * m.repeat_interleave(d).to(out[0].dtype),) + tuple(out[1:])
            hooks.append(layer.attention.self.register_forward_hook(head_hook))
        if ffn is not None:
            hooks.append(layer.intermediate.register_forward_hook(
                lambda mod, args, out, m=ffn[i]: out * m.to(out.dtype)))
        if i in skip:
            hooks.append(layer.register_forward_hook(
                lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()

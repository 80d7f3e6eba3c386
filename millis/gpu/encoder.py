"""A compact BERT-family encoder for CUDA graphs, loaded from Hugging Face weights.

Per layer: one fused QKV GEMM, scaled_dot_product_attention with an additive padding mask, the
output GEMM, bias + residual + LayerNorm in one kernel, the FFN-in GEMM, bias + GELU in one kernel,
the FFN-out GEMM, bias + residual + LayerNorm: 7 launches (HF eager launches ~12). The task head
(BertForSequenceClassification's pooler + classifier, or millis.tasks.pool) runs in fp32 on the
last hidden states, so it matches millis.tasks.TaskModel.

`fuse` picks the epilogues: "triton" (millis.gpu.kernels), "torch" (plain ops; the CPU path and the
reference) or "compile" (the torch layer compiled by Inductor, which fuses the same epilogues).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from millis.common.errors import MillisError
from millis.gpu import gemm, kernels
from millis.encoder.source import Pooling
from millis.encoder.tasks import pool

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FUSES = ("triton", "torch", "compile")
GEMMS = ("cublas", "triton")
GELUS = ("erf", "tanh-epilogue")
ACTS = ("gelu",)  # BERT's erf GELU; tanh variants would need their own epilogue


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture, read from a BERT config.json."""

    hidden: int              # H
    layers: int
    heads: int               # nh; head size hd = H / nh
    intermediate: int        # FFN width
    vocab: int
    max_positions: int       # absolute position embeddings: T <= max_positions
    type_vocab: int          # token type (segment) embeddings
    eps: float = 1e-12       # LayerNorm epsilon

    @classmethod
    def from_hf(cls, cfg: dict) -> "EncoderConfig":
        if cfg.get("model_type") != "bert":
            raise MillisError(f"the CUDA encoder supports BERT-family models (BERT, MiniLM), "
                              f"not {cfg.get('model_type') or '(none)'!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise MillisError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                              f"(absolute only)")
        if cfg.get("millis_pruned"):  # heads x head size != hidden: not this kernel's layout (yet)
            raise MillisError("the CUDA encoder does not run models with pruned attention heads; "
                              "serve them on CPU (ONNX Runtime)")
        if cfg.get("hidden_act", "gelu") not in ACTS:
            raise MillisError(f"hidden_act {cfg['hidden_act']!r} is not supported; supported: {', '.join(ACTS)}")
        return cls(hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
                   heads=int(cfg["num_attention_heads"]), intermediate=int(cfg["intermediate_size"]),
                   vocab=int(cfg["vocab_size"]), max_positions=int(cfg.get("max_position_embeddings", 512)),
                   type_vocab=int(cfg.get("type_vocab_size", 2)), eps=float(cfg.get("layer_norm_eps", 1e-12)))


@dataclass(frozen=True)
class RunOptions:
    """How the encoder runs (not what it is)."""

    dtype: str = "fp16"      # fp16 | bf16 | fp32 (fp32 is the CPU / reference path)
    fuse: str = "triton"     # triton | torch | compile (see the module docstring)
    gemm: str = "cublas"     # cublas: torch's GEMMs; triton: millis.gpu.gemm at <= gemm.MAX_M tokens with
                             # fuse=triton (faster alone, no faster in the model on an H100: see gemm.py)
    gelu: str = "erf"        # erf: BERT's exact GELU; tanh-epilogue: cuBLASLt's GELU epilogue on the FFN-in
                             # GEMM (one launch less a layer, the tanh approximation: a fidelity trade)
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise MillisError(f"unknown dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")
        if self.fuse not in FUSES:
            raise MillisError(f"unknown fuse {self.fuse!r}; supported: {', '.join(FUSES)}")
        if self.gemm not in GEMMS:
            raise MillisError(f"unknown gemm {self.gemm!r}; supported: {', '.join(GEMMS)}")
        if self.gelu not in GELUS:
            raise MillisError(f"unknown gelu {self.gelu!r}; supported: {', '.join(GELUS)}")


class LayerWeights(NamedTuple):
    wqkv: torch.Tensor  # (3H, H): query, key, value stacked, so one GEMM projects all three
    bqkv: torch.Tensor  # (3H,)
    wo: torch.Tensor    # (H, H) attention output
    bo: torch.Tensor
    ln1w: torch.Tensor
    ln1b: torch.Tensor
    w1: torch.Tensor    # (I, H) FFN in
    b1: torch.Tensor
    w2: torch.Tensor    # (H, I) FFN out
    b2: torch.Tensor
    ln2w: torch.Tensor
    ln2b: torch.Tensor


def layer_forward(x: torch.Tensor, attn_bias: torch.Tensor | None, lw: LayerWeights, B: int, T: int, heads: int,
                  eps: float, fused: bool, small: bool = False, gelu_tanh: bool = False) -> torch.Tensor:
    """One encoder layer. x (B*T, H) -> (B*T, H); attn_bias (B, 1, 1, T) additive, or None.
    small: few tokens, Triton GEMMs (split-K partials summed inside add_ln, bias + GELU in the
    FFN-in GEMM's epilogue: 6 launches a layer instead of 7). gelu_tanh: the FFN-in GEMM applies bias
    and tanh-approximated GELU itself (torch._addmm_activation -> cuBLASLt epilogue)."""
    H = x.shape[1]
    add_ln = kernels.add_ln if fused else kernels.add_ln_torch
    bias_gelu = kernels.bias_gelu if fused else kernels.bias_gelu_torch
    qkv = F.linear(x, lw.wqkv, lw.bqkv)                                     # (B*T, 3H)
    q, k, v = qkv.view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4)   # each (B, nh, T, hd), strided
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)        # (B, nh, T, hd)
    a = a.transpose(1, 2).reshape(B * T, H)                                 # a view when SDPA wrote BTHD
    if small:
        x = add_ln(gemm.linear_partials(a.contiguous(), lw.wo), lw.bo, x, lw.ln1w, lw.ln1b, eps)
        f = gemm.linear_gelu(x, lw.w1, lw.b1)                               # (B*T, I)
        return add_ln(gemm.linear_partials(f, lw.w2), lw.b2, x, lw.ln2w, lw.ln2b, eps)
    x = add_ln(F.linear(a, lw.wo), lw.bo, x, lw.ln1w, lw.ln1b, eps)
    if gelu_tanh and x.is_cuda:
        f = torch._addmm_activation(lw.b1, x, lw.w1.t(), use_gelu=True)     # (B*T, I)
    elif gelu_tanh:  # the CPU's _addmm_activation uses the exact GELU: say what CUDA computes
        f = F.gelu(F.linear(x, lw.w1, lw.b1), approximate="tanh")
    else:
        f = bias_gelu(F.linear(x, lw.w1), lw.b1)                            # (B*T, I)
    return add_ln(F.linear(f, lw.w2), lw.b2, x, lw.ln2w, lw.ln2b, eps)


_compiled_layer = None


def compiled_layer():
    """layer_forward through Inductor (default mode: cuBLAS GEMMs, fused epilogues), compiled once
    per shape; weights are arguments, so all layers share one compiled graph."""
    global _compiled_layer
    if _compiled_layer is None:
        import torch._dynamo

        for k in ("cache_size_limit", "recompile_limit"):  # one entry per (B, T, H, dtype)
            if hasattr(torch._dynamo.config, k):
                setattr(torch._dynamo.config, k, 256)
        _compiled_layer = torch.compile(layer_forward, dynamic=False, fullgraph=True)
    return _compiled_layer


class Encoder:
    """BERT encoder + task head. Call with (B, T) int64 tensors on its device -> (B, N) float32."""

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor], task: str, pooling: Pooling,
                 options: RunOptions = RunOptions()):
        if task not in ("classify", "embed"):
            raise MillisError(f"unknown task {task!r}; supported tasks: classify, embed")
        self.cfg, self.task, self.pooling, self.options = cfg, task, pooling, options
        dev, dt = torch.device(options.device), DTYPES[options.dtype]
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MillisError("the CUDA encoder needs a CUDA GPU (torch.cuda.is_available() is False)")
        if options.fuse == "compile" and dev.type != "cuda":
            raise MillisError("fuse='compile' is for CUDA; use fuse='torch' on the CPU")
        s = _strip_prefix(state)

        def get(name: str, dtype=dt) -> torch.Tensor:
            if name not in s:
                raise MillisError(f"the weights have no {name!r}: not a BERT checkpoint")
            return s[name].detach().to(device=dev, dtype=dtype).contiguous()

        e = "embeddings."
        self.word, self.pos = get(e + "word_embeddings.weight"), get(e + "position_embeddings.weight")
        self.typ = get(e + "token_type_embeddings.weight")
        self.emb_lnw, self.emb_lnb = get(e + "LayerNorm.weight"), get(e + "LayerNorm.bias")
        self.layers = []
        for i in range(cfg.layers):
            p = f"encoder.layer.{i}."
            at = p + "attention."
            wqkv = torch.cat([get(at + f"self.{n}.weight") for n in ("query", "key", "value")])
            bqkv = torch.cat([get(at + f"self.{n}.bias") for n in ("query", "key", "value")])
            self.layers.append(LayerWeights(
                wqkv, bqkv, get(at + "output.dense.weight"), get(at + "output.dense.bias"),
                get(at + "output.LayerNorm.weight"), get(at + "output.LayerNorm.bias"),
                get(p + "intermediate.dense.weight"), get(p + "intermediate.dense.bias"),
                get(p + "output.dense.weight"), get(p + "output.dense.bias"),
                get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias")))
        if task == "classify":  # the head stays fp32: (B, H) work, and logits keep their precision
            if "classifier.weight" not in s or "pooler.dense.weight" not in s:
                raise MillisError("task classify needs a sequence-classification checkpoint (pooler + classifier)")
            f32 = torch.float32
            self.pool_w, self.pool_b = get("pooler.dense.weight", f32), get("pooler.dense.bias", f32)
            self.cls_w, self.cls_b = get("classifier.weight", f32), get("classifier.bias", f32)
        self.out_dim = self.cls_w.shape[0] if task == "classify" else cfg.hidden
        self.device, self.dtype = dev, dt
        self.fused = options.fuse == "triton" and dev.type == "cuda"
        self.small_gemm = self.fused and options.gemm == "triton"
        self.gelu_tanh = options.gelu == "tanh-epilogue"
        self._layer = compiled_layer() if options.fuse == "compile" else layer_forward

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
        """dense=True promises an all-ones attention_mask (the caller checked): attention runs unmasked."""
        B, T = input_ids.shape
        if T > self.cfg.max_positions:
            raise MillisError(f"sequence length {T} exceeds the model's {self.cfg.max_positions} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        cfg = self.cfg
        embed = kernels.embed_ln if self.fused else kernels.embed_ln_torch
        x, attn_bias = embed(input_ids, token_type_ids, attention_mask, self.word, self.pos, self.typ,
                             self.emb_lnw, self.emb_lnb, cfg.eps)
        if dense:  # no padding anywhere: no mask, so SDPA may take the flash kernel
            attn_bias = None
        small = self.small_gemm and all(gemm.supported(B * T, n, k) for n, k in (
            (cfg.hidden, cfg.hidden), (cfg.intermediate, cfg.hidden), (cfg.hidden, cfg.intermediate)))
        for lw in self.layers:
            x = self._layer(x, attn_bias, lw, B, T, cfg.heads, cfg.eps, self.fused, small, self.gelu_tanh)
        h = x.view(B, T, cfg.hidden)
        if self.task == "classify":
            pooled = torch.tanh(F.linear(h[:, 0].float(), self.pool_w, self.pool_b))
            return F.linear(pooled, self.cls_w, self.cls_b)
        return pool(h.float(), attention_mask, self.pooling)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names: 'bert.embeddings...' in *ForSequenceClassification, 'embeddings...' in BertModel;
    old checkpoints call LayerNorm's parameters gamma / beta."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def load_state(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of a local HF directory, without building the HF model."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise MillisError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_file.read_text())
    if (model_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return cfg, load_file(str(model_dir / "model.safetensors"))
    if (model_dir / "pytorch_model.bin").is_file():
        return cfg, torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise MillisError(f"{model_dir} has no weights (model.safetensors or pytorch_model.bin)")


def from_hf(model, task: str, pooling: Pooling = Pooling(), options: RunOptions = RunOptions()) -> Encoder:
    """Build the encoder from a local HF directory (str / Path) or an in-memory HF model
    (BertModel, BertForSequenceClassification, or millis.tasks.TaskModel wrapping one)."""
    if isinstance(model, (str, Path)):
        cfg, state = load_state(Path(model))
    else:
        hf = getattr(model, "hf", model)  # TaskModel wraps the HF model
        cfg, state = hf.config.to_dict(), hf.state_dict()
    return Encoder(EncoderConfig.from_hf(cfg), state, task, pooling, options)

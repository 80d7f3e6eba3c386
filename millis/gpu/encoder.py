"""A compact BERT-family encoder for CUDA graphs, loaded from Hugging Face weights.

Per layer: one fused QKV GEMM, scaled_dot_product_attention with an additive padding mask, the
output GEMM, bias + residual + LayerNorm in one kernel, the FFN-in GEMM, bias + GELU in one kernel,
the FFN-out GEMM, bias + residual + LayerNorm: 7 launches (HF eager launches ~12). The task head
(BertForSequenceClassification's pooler + classifier, or millis.encoder.tasks.pool) runs in fp32 on the
last hidden states, so it matches millis.encoder.tasks.TaskModel.

`fuse` picks the epilogues: "triton" (millis.gpu.kernels) or "torch" (plain ops; the CPU path and
the reference). `gemm` int8 / fp8 runs the four GEMMs W8A8 (millis.gpu.w8a8: weights per channel,
activations per token quantized inside the GEMM kernel, bias + GELU in the FFN-in GEMM's epilogue).
Research variants of the layer (Triton split-K GEMMs, a tanh-GELU epilogue, the layer compiled by
Inductor) measured no better and live in bench/gpu_research/, which swaps `Encoder.layer` for its own
function of the same signature.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from millis.common.dtypes import DTYPE_NAMES, torch_dtype
from millis.common.errors import MillisError
from millis.common.files import weight_files
from millis.gpu import deberta, kernels, prenorm
from millis.gpu.w8a8 import GEMMS, QuantWeight, quantize_weight
from millis.gpu.w8a8_kernels import linear
from millis.encoder.bert_weights import (GEMM_PARTS, PROJECTION, REL_BIAS, EncoderConfig, MlmArrays, bert_names,
                                         check_parts, embedding_parts, head_activation, head_parts, layer_parts,
                                         relative_bias_table, relative_parts)
from millis.encoder.source import SPLADE, Pooling, pools_tokens
from millis.encoder.tasks import pool, splade_pool

FUSES = ("triton", "torch")
@dataclass(frozen=True)
class RunOptions:
    """How the encoder runs (not what it is)."""

    dtype: str = "fp16"      # fp16 | bf16 | fp32 (fp32 is the CPU / reference path)
    fuse: str = "triton"     # triton | torch (see the module docstring)
    device: str = "cuda"
    gemm: str = "fp"         # fp (dtype's GEMMs) | int8 | fp8 (W8A8, millis.gpu.w8a8)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise MillisError(f"unknown dtype {self.dtype!r}; supported: {', '.join(DTYPE_NAMES)}")
        if self.gemm not in GEMMS:
            raise MillisError(f"unknown gemm {self.gemm!r}; supported: {', '.join(GEMMS)}")
        if self.fuse not in FUSES:
            raise MillisError(f"unknown fuse {self.fuse!r}; supported: {', '.join(FUSES)}")


Weight = torch.Tensor | QuantWeight  # the GEMMs' weights: in the run dtype, or W8A8 (gemm int8 / fp8)


class LayerWeights(NamedTuple):
    wqkv: Weight        # (3H, H): query, key, value stacked, so one GEMM projects all three
    bqkv: torch.Tensor  # (3H,)
    wo: Weight          # (H, H) attention output
    bo: torch.Tensor
    ln1w: torch.Tensor
    ln1b: torch.Tensor
    w1: Weight          # (I, H) FFN in
    b1: torch.Tensor
    w2: Weight          # (H, I) FFN out
    b2: torch.Tensor
    ln2w: torch.Tensor
    ln2b: torch.Tensor


def attention(x: torch.Tensor, attn_bias: torch.Tensor | None, lw: LayerWeights, B: int, T: int,
              heads: int, fused: bool = False, first_only: bool = False) -> torch.Tensor:
    """Self-attention before its output projection: x (B*T, H) -> (B*T, H); first_only: the queries of each
    sequence's first token alone, against every key -> (B, H)."""
    H = x.shape[1]
    qkv = linear(x, lw.wqkv, lw.bqkv, kernel=fused)                         # (B*T, 3H)
    q, k, v = qkv.view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4)   # each (B, nh, T, hd), strided
    if first_only:
        q = q[:, :, :1]                                                     # (B, nh, 1, hd)
        if attn_bias is not None and attn_bias.shape[-2] > 1:              # MPNet's (., nh, T, T): query 0's row
            attn_bias = attn_bias[:, :, :1]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)        # (B, nh, T or 1, hd)
    return a.transpose(1, 2).reshape(-1, H)                                 # a view when SDPA wrote BTHD


def layer_forward(x: torch.Tensor, attn_bias: torch.Tensor | None, lw: LayerWeights, B: int, T: int, heads: int,
                  eps: float, fused: bool, observe: Callable | None = None) -> torch.Tensor:
    """One encoder layer. x (B*T, H) -> (B*T, H); attn_bias (B, 1, 1, T) additive, or None.
    fused: the Triton epilogues and W8A8 kernels (CUDA), else the torch ones. observe(lw, name, input): sees
    the input of each GEMM (name: qkv, o, inter, down; millis.encoder.smooth's calibration)."""
    see = observe or (lambda *a: None)
    see(lw, "qkv", x)
    return after_attention(attention(x, attn_bias, lw, B, T, heads, fused), x, lw, eps, fused, see)


def last_layer_first_rows(x: torch.Tensor, attn_bias: torch.Tensor | None, lw: LayerWeights, B: int, T: int,
                          heads: int, eps: float, fused: bool) -> torch.Tensor:
    """The last layer at each sequence's first token alone, for a head that reads no other row (pools_tokens
    false): every token's keys and values, one query a sequence, then O, LayerNorms and the FFN on those B
    rows. x (B*T, H) -> (B, H): the rows the whole layer gives at column 0."""
    a = attention(x, attn_bias, lw, B, T, heads, fused, first_only=True)   # (B, H)
    x0 = x.view(B, T, -1)[:, 0].contiguous()                                # the residual of those rows
    return after_attention(a, x0, lw, eps, fused, lambda *a: None)


def after_attention(a: torch.Tensor, x: torch.Tensor, lw: LayerWeights, eps: float, fused: bool,
                    see: Callable) -> torch.Tensor:
    """A layer from its attention's rows a on: x = LN1(x + a Wo + bo), then LN2(x + FFN(x)); (M, H) -> (M, H)."""
    add_ln = kernels.add_ln if fused else kernels.add_ln_torch
    see(lw, "o", a)
    x = add_ln(linear(a, lw.wo, kernel=fused), lw.bo, x, lw.ln1w, lw.ln1b, eps)
    see(lw, "inter", x)
    if isinstance(lw.w1, QuantWeight):  # bias + GELU in the W8A8 kernel's epilogue (not observed: no down input)
        f = linear(x, lw.w1, lw.b1, gelu=True, kernel=fused)                # (B*T, I)
    else:
        f = (kernels.bias_gelu if fused else kernels.bias_gelu_torch)(F.linear(x, lw.w1), lw.b1)
        see(lw, "down", f)
    return add_ln(linear(f, lw.w2, kernel=fused), lw.b2, x, lw.ln2w, lw.ln2b, eps)


class Encoder:
    """BERT encoder + task head. Call with (B, T) int64 tensors on its device -> (B, N) float32."""

    def __init__(self, cfg: EncoderConfig, state: dict[str, torch.Tensor], task: str, pooling: Pooling,
                 options: RunOptions = RunOptions()):
        self.cfg, self.task, self.pooling, self.options = cfg, task, pooling, options
        dev, dt = torch.device(options.device), torch_dtype(options.dtype)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MillisError("the CUDA encoder needs a CUDA GPU (torch.cuda.is_available() is False)")
        if options.gemm == "fp8" and dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
            raise MillisError(f"fp8 GEMMs need compute capability 8.9 or newer (Ada, Hopper); this GPU has "
                              f"{'.'.join(map(str, torch.cuda.get_device_capability(dev)))}")
        s = bert_names(state, cfg)
        check_parts(s, task, cfg)

        def get(names: tuple[str, ...], dtype=dt) -> torch.Tensor:  # the parts' tensors stacked (bert_weights)
            return torch.cat([s[n].detach().to(device=dev, dtype=dtype) for n in names]).contiguous()

        def gemm(names: tuple[str, ...]) -> Weight:  # a GEMM's weight: W8A8 from fp32
            return get(names) if options.gemm == "fp" else quantize_weight(get(names, torch.float32), options.gemm)

        self.pos = None  # (rotary positions: no table)
        for k, names in embedding_parts(cfg).items():
            setattr(self, k, get(names))
        # ELECTRA-small's projection E -> H after the embeddings' LayerNorm (None: none)
        self.emb_pw, self.emb_pb = (get(PROJECTION[k]) for k in PROJECTION) if cfg.embedding else (None, None)
        self.layers = [LayerWeights(**{k: gemm(n) if k in GEMM_PARTS else get(n) for k, n in layer_parts(i).items()})
                       for i in range(cfg.layers)]
        if task == "classify":  # the head stays fp32: (B, H) work, and logits keep their precision
            for k, names in head_parts(cfg).items():
                setattr(self, k, get(names, torch.float32))
        self.mlm = None  # SPLADE: the masked-LM head its vectors pool (bert_weights.MlmArrays' parts, below)
        if task == "embed" and pooling.mode == SPLADE:
            m = MlmArrays(Float32Arrays(s), cfg)
            on = [torch.from_numpy(a).to(dev) for a in (m.tw, m.tb, m.lnw, m.lnb)]  # the transform: fp32 (H x H)
            self.mlm = (*on, torch.from_numpy(m.wv).to(dev, dt), torch.from_numpy(m.bv).to(dev), m.eps)
        self.out_dim = self.cls_w.shape[0] if task == "classify" else cfg.vocab if self.mlm else cfg.hidden
        self.rel = self.rel_qk = None
        if cfg.rel_buckets:  # MPNet: (nh, P, P) bias of query q, key k, made once (a slice a call: graph-safe)
            self.rel = get((REL_BIAS,), torch.float32)  # (buckets, nh): what smooth / native read
            table, mid = relative_bias_table(self.rel.cpu().numpy(), cfg.max_positions)
            at = mid + torch.arange(cfg.max_positions)[:, None] - torch.arange(cfg.max_positions)[None, :]
            self.rel_qk = torch.from_numpy(table)[:, at].to(device=dev, dtype=dt).contiguous()
        self.device, self.dtype = dev, dt
        self.fused = options.fuse == "triton" and dev.type == "cuda"
        self.layer = layer_forward  # (x, attn_bias, weights, B, T, heads, eps, fused) -> x; benches swap it
        self.rope = prenorm.tables(cfg, dev) if cfg.prenorm else None  # ModernBERT's rotary tables by base
        self.rel_emb = self.rel_lnw = self.rel_lnb = None
        for k, names in relative_parts(cfg).items():  # DeBERTa's relative embeddings (what native reads too)
            setattr(self, k, get(names, torch.float32))
        self.dis = None if not cfg.disentangled else deberta.Tables(  # its position tables, from the fp32 weights
            cfg, (self.rel_emb, self.rel_lnw, self.rel_lnb),
            [(get(p["wqkv"], torch.float32), get(p["bqkv"], torch.float32))
             for p in map(layer_parts, range(cfg.layers))], dev, dt)
        self.observe: Callable | None = None  # ModernBERT's GEMM inputs seen (layer_forward's observe; smooth.py)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None, dense: bool = False, states: bool = False) -> torch.Tensor:
        """dense=True promises an all-ones attention_mask (the caller checked): attention runs unmasked. states=True:
        the last hidden states (B, T, H) every token's, before the head or pooling (TEI's /embed_all), unmasked."""
        B, T = input_ids.shape
        if T > self.cfg.max_positions:
            raise MillisError(f"sequence length {T} exceeds the model's {self.cfg.max_positions} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        cfg = self.cfg
        if cfg.prenorm:  # ModernBERT (millis.gpu.prenorm)
            h = prenorm.forward(self, input_ids, attention_mask, dense, self.observe)
            return h if states else self.head(h, attention_mask)
        if cfg.disentangled:  # DeBERTa (millis.gpu.deberta)
            h = deberta.forward(self, input_ids, attention_mask, token_type_ids, dense, after_attention, self.observe)
            return h if states else self.head(h, attention_mask)
        embed = kernels.embed_ln if self.fused else kernels.embed_ln_torch
        x, attn_bias = embed(input_ids, token_type_ids, attention_mask, self.word, self.pos, self.typ,
                             self.emb_lnw, self.emb_lnb, cfg.eps)            # (B*T, E)
        if self.emb_pw is not None:
            x = F.linear(x, self.emb_pw, self.emb_pb)                        # (B*T, H)
        if dense:  # no padding anywhere: no mask, so SDPA may take the flash kernel
            attn_bias = None
        if self.rel_qk is not None:  # (B or 1, nh, T, T): the relative bias (+ the padding mask)
            rel = self.rel_qk[None, :, :T, :T]
            attn_bias = rel if attn_bias is None else rel + attn_bias.to(rel.dtype)
        # a [CLS] head: the last layer at the first tokens alone (not while a calibration or a bench swaps the layer)
        first_only = not states and not pools_tokens(self.task, self.pooling) and self.layer is layer_forward
        for lw in self.layers[:-1] if first_only else self.layers:
            x = self.layer(x, attn_bias, lw, B, T, cfg.heads, cfg.eps, self.fused)
        if first_only:
            x = last_layer_first_rows(x, attn_bias, self.layers[-1], B, T, cfg.heads, cfg.eps, self.fused)
        h = x.view(B, -1, cfg.hidden)  # (B, T, H), or (B, 1, H): the first rows
        return h if states else self.head(h, attention_mask)

    def head(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, T or 1, H) -> logits (the classifier on the [CLS] row) or pooled vectors."""
        if self.task == "classify":  # on the first row, or on the mean of the rows (a ModernBERT's classifier_pooling)
            rows = pool(h.float(), attention_mask, Pooling("mean", False)) if self.cfg.head_pooling == "mean" else \
                h[:, 0].float()
            pooled = head_activation(F.linear(rows, self.pool_w, self.pool_b), self.cfg.head_act)
            if self.cfg.prenorm:  # ModernBERT's head: dense, GELU, LayerNorm
                pooled = F.layer_norm(pooled, (self.cfg.hidden,), self.head_lnw, self.head_lnb, self.cfg.eps)
            return F.linear(pooled, self.cls_w, self.cls_b)
        if self.mlm is not None:  # SPLADE: the masked LM's logits, max over the kept tokens, log(1 + relu)
            tw, tb, lnw, lnb, wv, bv, eps = self.mlm
            u = F.layer_norm(F.gelu(F.linear(h.float(), tw, tb)), (tw.shape[0],), lnw, lnb, eps)  # (B, T, H) fp32
            v = splade_pool(F.linear(u.to(wv.dtype), wv), attention_mask, bv)  # (B, T, V) in its dtype -> (B, V)
            return F.normalize(v, p=2.0, dim=-1) if self.pooling.normalize else v
        return pool(h.float(), attention_mask, self.pooling)


class Float32Arrays(Mapping):
    """A state dict's tensors as float32 numpy arrays, each converted when read (MlmArrays reads six of them)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def __getitem__(self, k: str) -> np.ndarray:
        return self.state[k].detach().float().cpu().numpy()

    def __contains__(self, k: object) -> bool:
        return k in self.state

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def load_state(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of a local HF directory, without building the HF model."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise MillisError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_file.read_text())
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):  # one file, or a sharded checkpoint's shards
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else
                     torch.load(f, map_location="cpu", weights_only=True))
    return cfg, state


def from_hf(model, task: str, pooling: Pooling = Pooling(), options: RunOptions = RunOptions()) -> Encoder:
    """Build the encoder from a local HF directory (str / Path) or an in-memory HF model
    (BertModel, BertForSequenceClassification, or millis.encoder.tasks.TaskModel wrapping one)."""
    if isinstance(model, (str, Path)):
        cfg, state = load_state(Path(model))
    else:
        hf = getattr(model, "hf", model)  # TaskModel wraps the HF model
        cfg, state = hf.config.to_dict(), hf.state_dict()
    return Encoder(EncoderConfig.from_hf(cfg), state, task, pooling, options)

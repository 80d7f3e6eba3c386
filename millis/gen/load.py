"""Load a decoder for generation: a HF safetensors directory or a llama2.c checkpoint.

`load(path, engine)` resolves the path, reads the config and weights into millis's own modules
(`Llama`, `GPT2`), applies the engine's precision, and gives every attention layer its static
KV cache. Supported: HF `llama`, `mistral`, `qwen2`, `gpt2` (config.json + model.safetensors, or
a sharded index), and llama2.c legacy v0 `.bin` files (header of 7 int32, fp32 weights) with the
tokenizer found next to them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from millis.common.dtypes import torch_dtype
from millis.common.errors import MillisError
from millis.gen.config import LLAMA_TYPES, MODEL_TYPES, EngineConfig, GPT2Config, LlamaConfig, ModelConfig
from millis.gen.llama2c import is_llama2c_checkpoint, read_llama2c
from millis.gen.models.layers import setup_caches


@dataclass
class Loaded:
    model: nn.Module   # Llama or GPT2, eval mode, caches set up
    config: ModelConfig
    tokenizer: object  # millis.gen.tokenizer.Tokenizer, or None (the engine then takes ids only)
    max_seq: int       # KV cache positions per slot
    source: str        # "hf:<model_type>" or "llama2c"
    quant_backend: str | None = None  # int8: "millis-avx2" or "torch-dynamic"; None unquantized


def load(path: str | Path, engine: EngineConfig) -> Loaded:
    p = Path(path)
    if not p.exists():
        raise MillisError(f"model {path} does not exist: give a HF directory (config.json + model.safetensors) "
                          f"or a llama2.c .bin checkpoint (or a directory holding one)")
    if p.is_dir() and (p / "config.json").is_file():
        cfg, sd, tok, source = _read_hf(p)
    else:
        ckpt = p if p.is_file() else next((f for f in sorted(p.glob("*.bin")) if is_llama2c_checkpoint(f)), None)
        if ckpt is None or not is_llama2c_checkpoint(ckpt):
            raise MillisError(f"{path} is neither a HF directory (no config.json) nor a llama2.c checkpoint "
                              f"(no .bin whose size matches its header)")
        from millis.gen.tokenizer import llama2c_tokenizer

        cfg, sd = read_llama2c(ckpt)
        tok, source = llama2c_tokenizer(ckpt.parent, ckpt, cfg.vocab_size), "llama2c"
    return build(cfg, sd, tok, source, engine)


def build(cfg: ModelConfig, sd: dict[str, torch.Tensor], tok, source: str, engine: EngineConfig) -> Loaded:
    from millis.gen.models.gpt2 import GPT2
    from millis.gen.models.llama import Llama

    if engine.device == "cuda" and not torch.cuda.is_available():
        raise MillisError("device cuda was asked for but CUDA is not available")
    model = (GPT2 if isinstance(cfg, GPT2Config) else Llama)(cfg)
    if cfg.tie_head:
        sd["head.weight"] = sd["wte.weight" if isinstance(cfg, GPT2Config) else "tok_emb.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise MillisError(f"weights do not match the config: {str(e).splitlines()[0]} ...") from None
    model = model.to(device=engine.device, dtype=torch_dtype(engine.dtype)).eval()
    if cfg.tie_head and engine.quant == "none":
        model.head.weight = getattr(model, "wte" if isinstance(cfg, GPT2Config) else "tok_emb").weight
    quant_backend = None
    if engine.quant != "none":
        from millis.gen.kernels.quant import quantize_int8

        quant_backend = quantize_int8(model, "torch" if engine.quant == "int8-torch" else "auto")
    max_seq = min(engine.max_seq or cfg.max_seq, cfg.max_seq)
    setup_caches(model, engine.max_batch, max_seq)
    return Loaded(model, cfg, tok, max_seq, source, quant_backend)


# ---------------------------------------------------------------------------- llama2.c checkpoints


# ---------------------------------------------------------------------------- HF directories

def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(d / shard)))
        return sd
    raise MillisError(f"{d} has no model.safetensors (or sharded index): only safetensors weights are read")


def _hf_config(d: dict, tied: bool) -> ModelConfig:
    mt = d.get("model_type")
    common = dict(bos_id=d.get("bos_token_id"), eos_id=_first(d.get("eos_token_id")), tie_head=tied)
    if mt == "gpt2":
        return GPT2Config(vocab_size=d["vocab_size"], dim=d["n_embd"], n_layers=d["n_layer"], n_heads=d["n_head"],
                          n_kv_heads=d["n_head"], max_seq=d["n_positions"], norm_eps=d.get("layer_norm_epsilon", 1e-5),
                          **common)
    if mt not in LLAMA_TYPES:
        raise MillisError(f"unsupported model_type {mt!r}; supported: {', '.join(MODEL_TYPES)}")
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise MillisError(f"unsupported {mt} variant: hidden_act must be silu, without attention/mlp biases")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    window = d.get("sliding_window") or 0
    if mt == "qwen2" and not d.get("use_sliding_window"):
        window = 0
    nh = d["num_attention_heads"]
    return LlamaConfig(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=nh,
        n_kv_heads=d.get("num_key_value_heads") or nh, max_seq=d.get("max_position_embeddings", 2048),
        hidden_dim=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_type=rope.get("rope_type", rope.get("type", "default")), rope_factor=rope.get("factor", 1.0),
        rope_low_freq_factor=rope.get("low_freq_factor", 1.0), rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
        rope_original_max_seq=rope.get("original_max_position_embeddings", 8192), qkv_bias=mt == "qwen2",
        sliding_window=window, head_dim_override=d.get("head_dim") or 0, **common)


def _first(x):
    return x[0] if isinstance(x, list) else x


def _read_hf(d: Path):
    from millis.gen.tokenizer import HFTokenizer

    raw = json.loads((d / "config.json").read_text())
    hf = _read_safetensors(d)
    hf = {k.removeprefix("transformer.").removeprefix("model."): v.float() for k, v in hf.items()}
    cfg = _hf_config(raw, tied="lm_head.weight" not in hf)
    try:
        sd = _gpt2_weights(hf, cfg) if isinstance(cfg, GPT2Config) else _llama_weights(hf, cfg)
    except KeyError as e:
        raise MillisError(f"{d}: weight {e.args[0]} is missing for a {raw['model_type']} model") from None
    tok = HFTokenizer(d / "tokenizer.json", cfg.eos_id) if (d / "tokenizer.json").is_file() else None
    return cfg, sd, tok, f"hf:{raw['model_type']}"


def _llama_weights(hf: dict, c: LlamaConfig) -> dict[str, torch.Tensor]:
    sd = {"tok_emb.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    if not c.tie_head:
        sd["head.weight"] = hf["lm_head.weight"]
    for i in range(c.n_layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        sd[f"layers.{i}.attn_norm.weight"] = hf[f"layers.{i}.input_layernorm.weight"]
        sd[f"layers.{i}.ffn_norm.weight"] = hf[f"layers.{i}.post_attention_layernorm.weight"]
        sd[f"layers.{i}.attn.wqkv.weight"] = torch.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"])
        if c.qkv_bias:
            sd[f"layers.{i}.attn.wqkv.bias"] = torch.cat([hf[a + f"{x}_proj.bias"] for x in "qkv"])
        sd[f"layers.{i}.attn.wo.weight"] = hf[a + "o_proj.weight"]
        sd[f"layers.{i}.ffn.w13.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        sd[f"layers.{i}.ffn.w2.weight"] = hf[m + "down_proj.weight"]
    return sd


def _gpt2_weights(hf: dict, c: GPT2Config) -> dict[str, torch.Tensor]:
    sd = {"wte.weight": hf["wte.weight"], "wpe.weight": hf["wpe.weight"],
          "ln_f.weight": hf["ln_f.weight"], "ln_f.bias": hf["ln_f.bias"]}
    if not c.tie_head:
        sd["head.weight"] = hf["lm_head.weight"]
    names = {"attn.c_attn": "attn.wqkv", "attn.c_proj": "attn.wo", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(c.n_layers):
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{ln}.{p}"] = hf[f"h.{i}.{ln}.{p}"]
        for src, dst in names.items():  # Conv1D keeps (in, out): transpose to Linear's (out, in)
            sd[f"layers.{i}.{dst}.weight"] = hf[f"h.{i}.{src}.weight"].t().contiguous()
            sd[f"layers.{i}.{dst}.bias"] = hf[f"h.{i}.{src}.bias"]
    return sd

"""Load a decoder for generation: a HF safetensors directory or a llama2.c checkpoint.

`load(path, engine)` resolves the path, reads the config and weights into millis's own modules
(`Llama`, `GPT2`), applies the engine's precision, and gives every attention layer its static
KV cache. Supported: HF `llama`, `mistral`, `qwen2`, `gpt2` (config.json + model.safetensors, or
a sharded index), and llama2.c legacy v0 `.bin` files (header of 7 int32, fp32 weights) with the
tokenizer found next to them.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from millis.common.dtypes import torch_dtype
from millis.common.errors import MillisError
from millis.common.files import weight_files
from millis.gen.config import EngineConfig, GPT2Config, LlamaConfig, ModelConfig
from millis.gen.hf_config import hf_model_config
from millis.gen.llama2c import is_llama2c_checkpoint, read_llama2c
from millis.gen.models.layers import setup_caches


@dataclass
class Loaded:
    model: nn.Module   # Llama or GPT2, eval mode, caches set up
    config: ModelConfig
    tokenizer: object  # millis.gen.tokenizer.Tokenizer, or None (the engine then takes ids only)
    max_seq: int       # KV cache positions per slot
    source: str        # "hf:<model_type>", "llama2c" or "gguf:<arch>"
    quant_backend: str | None = None  # "millis-avx2", "torch-dynamic", "triton-<format>" (GPU); None unquantized
    max_batch: int = 1  # slots
    device: str = "cpu"
    kv: object = None   # native models: their PagedKV (the engine reserves and releases blocks)
    chat_template: str | None = None  # GGUF: the template of the file's metadata
    tool_template: str | None = None  # GGUF: its tool_use template (requests with tools), where it has one
    special_tokens: dict | None = None
    source_path: str = ""


def load(path: str | Path, engine: EngineConfig) -> Loaded:
    from millis.gen.builtin import resolve_model
    from millis.gen.gguf import is_gguf

    p = Path(resolve_model(str(path)))
    if p.is_file() and is_gguf(p):
        return load_gguf(p, engine)
    if not p.exists():
        raise MillisError(f"model {path} does not exist: give a GGUF file, a HF directory (config.json + "
                          f"model.safetensors) or a llama2.c .bin checkpoint (or a directory holding one)")
    if p.is_dir() and (p / "config.json").is_file():
        cfg, sd, tok, source = _read_hf(p)
    else:
        ckpt = p if p.is_file() else next((f for f in sorted(p.glob("*.bin")) if is_llama2c_checkpoint(f)), None)
        if ckpt is None or not is_llama2c_checkpoint(ckpt):
            ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
            hint = f"; give the GGUF file itself ({ggufs[0].name})" if ggufs else ""
            raise MillisError(f"{path} is neither a HF directory (no config.json) nor a llama2.c checkpoint "
                              f"(no .bin whose size matches its header){hint}")
        from millis.gen.tokenizer import llama2c_tokenizer

        cfg, sd = read_llama2c(ckpt)
        tok, source = llama2c_tokenizer(ckpt.parent, ckpt, cfg.vocab_size), "llama2c"
    return build(cfg, sd, tok, source, engine)


def build(cfg: ModelConfig, sd: dict[str, torch.Tensor], tok, source: str, engine: EngineConfig) -> Loaded:
    from millis.gen.models.gpt2 import GPT2
    from millis.gen.models.llama import Llama

    check_state(cfg, sd, GPT2 if isinstance(cfg, GPT2Config) else Llama)
    if runs_native(engine):
        return native_from_state(cfg, sd, tok, source, engine)

    if engine.device == "cuda" and not torch.cuda.is_available():
        raise MillisError("device cuda was asked for but CUDA is not available")
    with no_weight_init():
        model = (GPT2 if isinstance(cfg, GPT2Config) else Llama)(cfg)
    if cfg.tie_head:  # into a copy: the caller's dict stays as check_state read it (a second build from it)
        sd = {**sd, "head.weight": sd["wte.weight" if isinstance(cfg, GPT2Config) else "tok_emb.weight"]}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise MillisError(f"weights do not match the config: {str(e).splitlines()[0]} ...") from None
    model = model.to(device=engine.device, dtype=torch_dtype(engine.dtype)).eval()
    if cfg.tie_head and engine.quant == "none":
        model.head.weight = getattr(model, "wte" if isinstance(cfg, GPT2Config) else "tok_emb").weight
    quant_backend = None
    if engine.device == "cuda" and engine.quant != "none":
        from millis.gpu.weight_only import quantize_and_tune

        quant_backend = quantize_and_tune(model, engine.quant)
    elif engine.quant != "none":
        from millis.kernels.quant import quantize_int8

        quant_backend = quantize_int8(model, "torch" if engine.quant == "int8-torch" else "auto")
    max_seq = static_max_seq(cfg, engine, torch_dtype(engine.dtype).itemsize)
    setup_caches(model, engine.max_batch, max_seq)
    return Loaded(model, cfg, tok, max_seq, source, quant_backend, engine.max_batch, engine.device)


def check_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], cls) -> None:
    """Every weight the config implies, of its shape, and no other: as the torch path's strict load, but before
    the native kernels take raw pointers (a config larger than its weights read past them: a segfault)."""
    with torch.device("meta"):  # shapes only: nothing allocated
        want = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    if cfg.tie_head:
        want.pop("head.weight", None)
    why = [f"{k} is {tuple(sd[k].shape)}, expected {s}" for k, s in want.items()
           if k in sd and tuple(sd[k].shape) != s]
    missing, extra = [k for k in want if k not in sd], sorted(set(sd) - set(want))
    why = why[:3] + [f"missing {', '.join(missing[:3])}"] * bool(missing) + [f"unused {', '.join(extra[:3])}"] * bool(extra)
    if why:
        raise MillisError(f"weights do not match the config: {'; '.join(why)}")


@contextmanager
def no_weight_init():
    """Build modules without random initialisation: the strict load_state_dict that follows overwrites every
    parameter (a Llama-3.2-1B-shaped model would draw 1.2B random values first, for nothing)."""
    saved = [(cls, cls.reset_parameters) for cls in (nn.Linear, nn.Embedding)]
    for cls, _ in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


def static_max_seq(cfg: ModelConfig, engine: EngineConfig, itemsize: int) -> int:
    """Positions per slot of the torch models' static KV cache (max_batch rows of max_seq positions, K and V
    per layer), sized by memory: --max-seq when given, else as many as the KV budget holds for every slot,
    at most the model's maximum. Without the cap, a Llama-3.2-1B config (131,072 positions) at 32 slots
    would allocate about 275 GB."""
    from millis.gen.models.native_llama import kv_bytes_per_token

    per_position = kv_bytes_per_token(cfg, itemsize) * engine.max_batch  # all slots
    budget = kv_budget_bytes(engine)
    if engine.max_seq:
        max_seq = min(engine.max_seq, cfg.max_seq)
        need = (f"--max-seq {max_seq} at --max-batch {engine.max_batch} needs {max_seq * per_position >> 20} MiB "
                "of KV cache")
        if engine.kv_memory_mb and max_seq * per_position > budget:
            raise MillisError(f"{need}, over --kv-memory-mb {engine.kv_memory_mb}")
        free = free_memory(engine.device)  # an explicit size still has to fit: a clear error, not an OOM at load
        if max_seq * per_position > free:
            raise MillisError(f"{need}, over the {free >> 20} MiB free on the {engine.device}: lower --max-seq or "
                              f"--max-batch")
        return max_seq
    max_seq = min(cfg.max_seq, budget // per_position)
    if max_seq < MIN_POSITIONS:
        raise MillisError(f"the KV cache budget of {budget >> 20} MiB holds {max_seq} positions per slot at "
                          f"--max-batch {engine.max_batch} (at least {MIN_POSITIONS}): raise --kv-memory-mb, "
                          f"lower --max-batch or give --max-seq")
    return max_seq


# ---------------------------------------------------------------------------- GGUF files
# Weights stay in their block formats on millis's native kernels. The KV cache is paged and sized by
# memory (`EngineConfig.kv_memory_mb`; default min(512 MiB, a quarter of the memory available now)),
# not by slots x context: a 135M model served with 32 slots of 8,192 positions would otherwise hold
# gigabytes it never uses.

DEFAULT_KV_MB = 512
MIN_POSITIONS = 32  # the fewest KV positions per slot (and per pool) a model loads with


def free_memory(device: str) -> int:
    """Bytes free now: the GPU's (torch.cuda.mem_get_info) on "cuda", else the host's available memory."""
    from millis.common.hardware import available_memory

    return torch.cuda.mem_get_info()[0] if device == "cuda" else available_memory()


def kv_budget_bytes(engine: EngineConfig) -> int:
    """The KV cache's memory: --kv-memory-mb, else on the CPU min(512 MiB, a quarter of the memory
    available now), on a GPU half of the device memory free after the weights are loaded."""
    if engine.kv_memory_mb:
        return engine.kv_memory_mb << 20
    if engine.device == "cuda":
        return free_memory("cuda") // 2
    return min(DEFAULT_KV_MB << 20, free_memory("cpu") // 4)


def load_gguf(path: str | Path, engine: EngineConfig) -> Loaded:
    """On the CPU, the file's block formats on millis's native kernels; on a GPU (or with the kernels off),
    its weights dequantized into the torch model at the engine's dtype (gguf_torch.py)."""
    from millis.gen.gguf import read_gguf
    from millis.kernels.native import native_isa

    g = read_gguf(path)
    if engine.device != "cpu" or native_isa() is None:
        if engine.quant != "none" and engine.device == "cpu":
            raise MillisError(f"--quant {engine.quant} runs on the CPU kernels, which are off: a GGUF file is "
                              f"then dequantized to --dtype {engine.dtype}")
        from millis.gen.gguf_torch import gguf_state_dict

        loaded = build(g.config, gguf_state_dict(g), g.tokenizer, f"gguf:{g.arch}", engine)
        loaded.chat_template, loaded.special_tokens = g.chat_template, g.special_tokens
    else:
        if engine.dtype != "fp32" or engine.quant not in ("none", "int8"):
            raise MillisError(f"a GGUF file keeps its own weight formats (or --quant int8 requantizes its float "
                              f"matrices to millis's int8): got dtype {engine.dtype}, quant {engine.quant}")
        tensors = int8_matrices(g.tensors) if engine.quant == "int8" else g.tensors
        loaded = _native(g.config, tensors, g.rope_neox, g.tokenizer, f"gguf:{g.arch}", engine,
                         g.chat_template, g.special_tokens)
    loaded.tool_template = g.tool_template
    return loaded


def _native(c: ModelConfig, tensors: dict, neox: bool, tok, source: str, engine: EngineConfig,
            template: str | None = None, special: dict | None = None) -> Loaded:
    from millis.gen.models.native_llama import NativeLlama, kv_bytes_per_token

    max_seq = min(engine.max_seq or c.max_seq, c.max_seq)
    budget = kv_budget_bytes(engine)
    if budget < kv_bytes_per_token(c) * MIN_POSITIONS:
        raise MillisError(f"--kv-memory-mb {engine.kv_memory_mb} holds fewer than {MIN_POSITIONS} positions of "
                          f"this model ({kv_bytes_per_token(c)} bytes each)")
    if not engine.max_seq:  # the model's context, within what the KV pool holds: the RoPE table and the slots'
        max_seq = min(max_seq, budget // kv_bytes_per_token(c))  # page tables are max_seq long (16M: 6.4 GB, 16 s)
    model = NativeLlama(c, tensors, neox, engine.max_batch, max_seq, budget, engine.threads)
    model.kv.prefix_cache = engine.prefix_cache
    return Loaded(model, c, tok, max_seq, source, "millis-int8" if engine.quant == "int8" else None,
                  max_batch=engine.max_batch, device="cpu", kv=model.kv, chat_template=template,
                  special_tokens=special)


@dataclass(frozen=True)
class Weight:
    """A tensor as the native model takes it (the shape of millis.gen.gguf.GGUFTensor)."""

    qtype: str
    shape: tuple[int, ...]
    data: object  # numpy: fp32 values, or block bytes (rows, row_bytes)


def int8_matrices(tensors: dict) -> dict:
    """millis's int8: every float matrix as Q8_0 bytes (int8 weights, one fp16 scale per 32, llama.cpp's
    format; a Q8_0 matrix as it is), run against activations quantized to int16 per 32 (packed16.c).
    A file whose matrices already hold another block format is refused: it is quantized already."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from millis.gen.gguf import dequantize
    from millis.gen.models.native_llama import INT8

    out = {}
    for name, t in tensors.items():
        if name == "position_embd.weight":  # GPT-2's position table: added to the embedding, not a matmul
            pass
        elif len(t.shape) == 2 and t.qtype == "Q8_0":
            t = Weight(INT8, tuple(t.shape), t.data)
        elif len(t.shape) == 2 and t.qtype in ("F32", "F16", "BF16") and t.shape[1] % 32 == 0:
            w = np.asarray(t.data, dtype=np.float32) if t.qtype == "F32" else dequantize(t).numpy()
            t = Weight(INT8, tuple(t.shape), quantize(np.ascontiguousarray(w), GGMLQuantizationType.Q8_0))
        elif len(t.shape) == 2 and t.qtype not in ("F32", "F16", "BF16"):
            raise MillisError(f"--quant int8 requantizes float matrices, but {name} is {t.qtype} already: "
                              f"run the file as it is (--quant none)")
        out[name] = t
    return out


def runs_native(engine: EngineConfig) -> bool:
    """The one rule for HF and llama2.c models: on the CPU, fp32 and millis's int8 run on millis's C step
    (GGUF-layout tensors, paged KV cache); torch runs bf16, int8-torch, CUDA, and fp32 when the native
    kernels are off (MILLIS_NO_KERNELS). GGUF files always run native."""
    from millis.kernels.native import native_isa

    if engine.device != "cpu":
        return False
    return engine.quant == "int8" or (engine.quant == "none" and engine.dtype == "fp32" and native_isa() is not None)


def native_from_state(c: ModelConfig, sd: dict[str, torch.Tensor], tok, source: str, engine: EngineConfig) -> Loaded:
    """A state dict in millis's layout (models/llama.py, models/gpt2.py) on the native kernels: its fp32
    matrices as they are, or as millis's int8 with `--quant int8`."""
    t = (gpt2_tensors if isinstance(c, GPT2Config) else llama_tensors)(c, sd)
    return _native(c, int8_matrices(t) if engine.quant == "int8" else t, True, tok, source, engine)


def f32_weight(x: torch.Tensor) -> Weight:
    return Weight("F32", tuple(x.shape), x.detach().float().contiguous().numpy())


def llama_tensors(c: LlamaConfig, sd: dict[str, torch.Tensor]) -> dict[str, Weight]:
    """millis's Llama layout (HF rotate_half RoPE, fused wqkv / w13) -> GGUF tensor names."""
    f32, qd, kd = f32_weight, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    t = {"token_embd.weight": f32(sd["tok_emb.weight"]), "output_norm.weight": f32(sd["norm.weight"])}
    if not c.tie_head:
        t["output.weight"] = f32(sd["head.weight"])
    for i in range(c.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for name, w in zip(("attn_q", "attn_k", "attn_v"), sd[p + "attn.wqkv.weight"].split([qd, kd, kd])):
            t[b + name + ".weight"] = f32(w)
        if c.qkv_bias:
            for name, w in zip(("attn_q", "attn_k", "attn_v"), sd[p + "attn.wqkv.bias"].split([qd, kd, kd])):
                t[b + name + ".bias"] = f32(w)
        gate, up = sd[p + "ffn.w13.weight"].split(c.hidden_dim)
        t.update({b + "attn_output.weight": f32(sd[p + "attn.wo.weight"]), b + "ffn_gate.weight": f32(gate),
                  b + "ffn_up.weight": f32(up), b + "ffn_down.weight": f32(sd[p + "ffn.w2.weight"]),
                  b + "attn_norm.weight": f32(sd[p + "attn_norm.weight"]),
                  b + "ffn_norm.weight": f32(sd[p + "ffn_norm.weight"])})
    return t


def gpt2_tensors(c: GPT2Config, sd: dict[str, torch.Tensor]) -> dict[str, Weight]:
    """millis's GPT-2 layout (Linear (out, in), fused wqkv) -> GGUF-style names, LayerNorm biases beside."""
    f32 = f32_weight
    t = {"token_embd.weight": f32(sd["wte.weight"]), "position_embd.weight": f32(sd["wpe.weight"]),
         "output_norm.weight": f32(sd["ln_f.weight"]), "output_norm.bias": f32(sd["ln_f.bias"])}
    if not c.tie_head:
        t["output.weight"] = f32(sd["head.weight"])
    names = {"attn.wo": "attn_output", "mlp.fc": "ffn_up", "mlp.proj": "ffn_down", "ln_1": "attn_norm",
             "ln_2": "ffn_norm"}
    for i in range(c.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for part in ("weight", "bias"):
            for name, w in zip(("attn_q", "attn_k", "attn_v"), sd[p + "attn.wqkv." + part].split(c.dim)):
                t[b + name + "." + part] = f32(w)
            for src, dst in names.items():
                t[b + dst + "." + part] = f32(sd[p + src + "." + part])
    return t


# ---------------------------------------------------------------------------- HF directories

def read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = weight_files(d)  # the one file, or a sharded checkpoint's shards
    if files[0].suffix != ".safetensors":
        raise MillisError(f"{d} has {files[0].name}: only safetensors weights are read (model.safetensors, or "
                          f"model.safetensors.index.json and its shards)")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _read_hf(d: Path):
    from millis.gen.tokenizer import HFTokenizer

    raw = json.loads((d / "config.json").read_text())
    if (d / "generation_config.json").is_file():  # its eos_token_id list ends generation too (HF generate)
        raw["generation_config"] = json.loads((d / "generation_config.json").read_text())
    hf = read_safetensors(d)
    hf = {k.removeprefix("transformer.").removeprefix("model."): v.float() for k, v in hf.items()}
    # the file's lm_head where it has one (transformers 5 keeps a tied config's differing head), else the embedding if
    # config.json ties them (GPT-2's default; the Llama family's: untied, and a missing head was run as the embedding)
    cfg = hf_model_config(raw, tied="lm_head.weight" not in hf)  # an encoder's model_type refused first, by name
    if cfg.tie_head and not raw.get("tie_word_embeddings", raw.get("model_type") == "gpt2"):
        raise MillisError(f"{d}: config.json has tie_word_embeddings false (or leaves it at its {raw.get('model_type')}"
                          f" default, false) but the weights have no lm_head.weight")
    try:
        sd = _gpt2_weights(hf, cfg) if isinstance(cfg, GPT2Config) else llama_weights(hf, cfg)
    except KeyError as e:
        raise MillisError(f"{d}: weight {e.args[0]} is missing for a {raw['model_type']} model") from None
    tok = HFTokenizer(d / "tokenizer.json", cfg.eos_id) if (d / "tokenizer.json").is_file() else None
    return cfg, sd, tok, f"hf:{raw['model_type']}"


def llama_weights(hf: dict, c: LlamaConfig) -> dict[str, torch.Tensor]:
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

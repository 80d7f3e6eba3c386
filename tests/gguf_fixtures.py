"""Tiny random GGUF models for tests, written with gguf.GGUFWriter (the reference writer).

    cfg = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=128, hidden_dim=128)
    ref = write_tiny_gguf(path, cfg, random_llama_tensors(cfg, qtype="Q8_0"))

`ref[name]` is each tensor's fp32 value as stored (dequantized by gguf.quants), in torch order, so a
test can build its reference model from it. Types gguf can quantize (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, ...) are quantized from the array given; Q4_K / Q5_K / Q6_K (and any type gguf only
dequantizes, e.g. IQ2_XXS) are random valid blocks whose scales are small sane f16 values: the array
gives only the shape.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

from millis.gen.config import LlamaConfig
from millis.gen.gguf import expected_shapes, llama3_rope_factors

# K-quant block layouts: where the f16 super-block scales sit, and a d that keeps |w| below ~1
K_SCALES = {"Q4_K": ((0, 1e-3), (2, 1e-3)),  # d, dmin: w = d*sc*q - dmin*m, sc, m < 64, q < 16
            "Q5_K": ((0, 5e-4), (2, 1e-3)),  # q < 32
            "Q6_K": ((208, 2e-4),)}          # w = d*scale*q, |scale| <= 128, |q| <= 32

GPT2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġ w", "a n", "Ġ o", "Ġ 1"]
SPM_CONTROL = ["<s>", "</s>", "[INST]", "[/INST]"]  # after <unk>: byte pieces start at 5, not llama2.c's 3
SPM_CHARS = "▁etaoinshrdlucmwfgypbvkjxqzTIWH.,!?'"
SPM_MERGED = ["▁t", "he", "▁the", "in", "er", "▁a", "on", "re", "▁s", "at", "en", "▁w", "▁o", "an", "▁th", "ing",
              "▁in", "nd", "▁and", "ll", "▁he", "ed"]
SMALL_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_chars() -> list[str]:
    """GPT-2's printable spelling of bytes 0..255 (bytes_to_unicode)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b if b in keep else next(extra)) for b in range(256)]


def gpt2_vocab(vocab_size: int, added: list[tuple[str, int]] = ()) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tiny byte-level BPE padded with unused tokens to vocab_size;
    `added` ((text, type) pairs) are its last ids, as a model's added tokens follow its vocabulary."""
    merged = ["".join(m.split(" ")) for m in GPT2_MERGES]
    tokens = GPT2_SPECIAL + byte_chars() + merged
    types = [3] * len(GPT2_SPECIAL) + [1] * (256 + len(merged))
    return _pad(tokens, types, vocab_size, added) + (GPT2_MERGES,)


def spm_vocab(vocab_size: int, added: list[tuple[str, int]] = ()) -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a tiny SentencePiece BPE with byte fallback, padded to vocab_size;
    `added` as gpt2_vocab's."""
    tokens = ["<unk>"] + SPM_CONTROL + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_CHARS) + SPM_MERGED
    types = [2] + [3] * len(SPM_CONTROL) + [6] * 256 + [1] * (len(SPM_CHARS) + len(SPM_MERGED))
    scores = ([0.0] * (1 + len(SPM_CONTROL) + 256) + [-100.0 - i for i in range(len(SPM_CHARS))]
              + [-1.0 - i for i in range(len(SPM_MERGED))])  # earlier merges score higher, chars lowest
    n_unused = vocab_size - len(tokens) - len(added)
    tokens, types = _pad(tokens, types, vocab_size, added)
    return tokens, types, scores + [-1e9] * n_unused + [0.0] * len(added)


def _pad(tokens: list[str], types: list[int], vocab_size: int,
         added: list[tuple[str, int]] = ()) -> tuple[list[str], list[int]]:
    n = vocab_size - len(tokens) - len(added)
    if n < 0:
        raise ValueError(f"the tiny tokenizer needs vocab_size >= {len(tokens) + len(added)}, got {vocab_size}")
    return (tokens + [f"<unused{i}>" for i in range(n)] + [t for t, _ in added],
            types + [5] * n + [k for _, k in added])


def random_llama_tensors(cfg: LlamaConfig, qtype: str = "F32", qtypes: dict[str, str] | None = None,
                         seed: int = 0, embed_qtype: str | None = None) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of `cfg` (expected_shapes; output.weight unless tie_head): matrices in `qtype`, the
    embedding in `embed_qtype` (default `qtype`), norms and biases F32; `qtypes` overrides by name."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg, not cfg.tie_head).items():
        q = (embed_qtype or qtype) if name == "token_embd.weight" else qtype
        q = "F32" if len(shape) == 1 else q
        norm = name.endswith("norm.weight")  # RMSNorm gains near 1
        w = (1.0 if norm else 0.0) + (0.1 if norm else 0.2) * rng.standard_normal(shape)
        out[name] = (w.astype(np.float32), (qtypes or {}).get(name, q))
    return out


def encode_tensor(w: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(what GGUFWriter stores: fp32 / fp16 array or uint8 bytes (rows, row_bytes), the fp32 value it holds)."""
    t = GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if qtype not in K_SCALES:
        try:
            raw = quants.quantize(w.astype(np.float32), t)
            return raw, quants.dequantize(raw, t).reshape(w.shape)
        except NotImplementedError:
            pass  # a type gguf only reads (IQ*): random bytes
    block, size = GGML_QUANT_SIZES[t]
    rows, cols = int(np.prod(w.shape[:-1])), w.shape[-1]
    if cols % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} values, got {cols}")
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off, scale in K_SCALES.get(qtype, ((0, 1e-3),)):  # other types (IQ*) start with their f16 d
        d = (scale * rng.uniform(0.5, 1.0, raw.shape[:2])).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(*w.shape[:-1], cols // block * size)
    return raw, quants.dequantize(raw, t).reshape(w.shape)


def write_tiny_gguf(path, cfg: LlamaConfig, tensors: dict[str, tuple[np.ndarray, str]], tokenizer: str = "gpt2",
                    arch: str = "llama", pre: str = "smollm", add_bos: bool | None = None,
                    chat_template: str | None = SMALL_CHAT, extra: dict | None = None,
                    seed: int = 0, added: list[tuple[str, int]] = (), merges: bool = True) -> dict[str, np.ndarray]:
    """Write a GGUF holding `cfg` as llama.cpp's converter writes it, `tensors` ({name: (fp32 array in
    torch order, qtype)}) and a tiny `gpt2` (byte-level BPE, pre-tokenizer `pre`) or `llama`
    (SentencePiece) tokenizer of cfg.vocab_size tokens: BOS 1, EOS 2, unknown 0 whatever cfg says.
    A llama3 RoPE config adds rope_freqs.weight. `extra`: more metadata {key: str | int | float |
    bool | list}. `added`: (text, token type) pairs that take the vocabulary's last ids; merges False: a BPE
    vocabulary without its merges (corrupt). Returns
    {name: the fp32 value stored}."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(Path(path)), arch)
    k = arch + "."
    for key, val in ((k + "context_length", cfg.max_seq), (k + "embedding_length", cfg.dim),
                     (k + "block_count", cfg.n_layers), (k + "feed_forward_length", cfg.hidden_dim),
                     (k + "attention.head_count", cfg.n_heads), (k + "attention.head_count_kv", cfg.n_kv_heads),
                     (k + "rope.dimension_count", cfg.head_dim), (k + "vocab_size", cfg.vocab_size)):
        w.add_uint32(key, val)
    w.add_float32(k + "attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32(k + "rope.freq_base", cfg.rope_theta)
    if cfg.head_dim_override:
        w.add_uint32(k + "attention.key_length", cfg.head_dim)
        w.add_uint32(k + "attention.value_length", cfg.head_dim)
    if cfg.sliding_window:
        w.add_uint32(k + "attention.sliding_window", cfg.sliding_window)
    if cfg.rope_type == "linear":
        w.add_string(k + "rope.scaling.type", "linear")
        w.add_float32(k + "rope.scaling.factor", cfg.rope_factor)
    tensors = dict(tensors)
    if cfg.rope_type == "llama3" and "rope_freqs.weight" not in tensors:
        f = llama3_rope_factors(cfg.rope_theta, cfg.head_dim, cfg.rope_factor, cfg.rope_low_freq_factor,
                                cfg.rope_high_freq_factor, cfg.rope_original_max_seq)
        tensors["rope_freqs.weight"] = (f.astype(np.float32), "F32")
    _write_tokenizer(w, cfg, tokenizer, pre, add_bos, added, merges)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, val in (extra or {}).items():
        add = {str: w.add_string, bool: w.add_bool, int: w.add_uint32, float: w.add_float32, list: w.add_array}
        add[type(val)](key, val)
    ref = {}
    for name, (arr, qtype) in tensors.items():
        raw, ref[name] = encode_tensor(np.asarray(arr, dtype=np.float32), qtype, rng)
        is_raw = raw.dtype == np.uint8
        w.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[qtype] if is_raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def _write_tokenizer(w: GGUFWriter, cfg: LlamaConfig, kind: str, pre: str, add_bos: bool | None,
                     added: list[tuple[str, int]], with_merges: bool = True) -> None:
    if kind == "gpt2":
        tokens, types, merges = gpt2_vocab(cfg.vocab_size, added)
        w.add_tokenizer_model("gpt2")
        if pre:  # "": a file converted before llama.cpp wrote the key
            w.add_tokenizer_pre(pre)
        if with_merges:  # False: a corrupt file, for the reader's error
            w.add_token_merges(merges)
        bos, eos, unk = 1, 2, 0
        w.add_add_bos_token(bool(add_bos))
    elif kind == "llama":
        tokens, types, scores = spm_vocab(cfg.vocab_size, added)
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        bos, eos, unk = 1, 2, 0
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    else:  # any other tokenizer.ggml.model, with a gpt2 vocabulary: for the reader's error
        tokens, types, _ = gpt2_vocab(cfg.vocab_size)
        w.add_tokenizer_model(kind)
        bos, eos, unk = 1, 2, 0
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)

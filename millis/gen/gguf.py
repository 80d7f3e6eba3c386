"""GGUF (llama.cpp's one-file model) for Llama-family decoders: config, raw tensors, tokenizer, chat template.

`read_gguf(path)` parses the header itself (struct over an mmap: gguf.GGUFReader spends seconds on a
100k-string vocabulary) and hands out each tensor's raw bytes, memory-mapped, in torch order, for the
native kernels. `dequantize(t)` is the fp32 reference, through gguf.quants.

Layout notes a consumer needs:
- GGUF lists dims fastest-first (ne0 = columns); `GGUFTensor.shape` is reversed: (out_features, in_features).
- A quantized row is `cols // block` blocks of `block_bytes`; `data` is uint8 (rows, row_bytes).
- llama / mistral: llama.cpp's converter permuted the q and k rows so that RoPE rotates adjacent pairs
  (2i, 2i+1) ("normal" RoPE, `rope_neox` False); qwen2 keeps HF's rotate_half halves (`rope_neox` True).
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from millis.common.errors import MillisError
from millis.gen.config import LlamaConfig
from millis.gen.gguf_tokenizer import CONTROL, opt_int, tokenizer_of

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
ARCHS = ("llama", "mistral", "qwen2")
MAGIC = b"GGUF"
# ggml type id -> name (ggml.h's enum; ids 4, 5 and 31-33 were removed upstream)
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
              19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
              27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
# supported type -> (values per block, bytes per block)
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
          "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_attr before it became flags)


@dataclass(frozen=True)
class GGUFTensor:
    name: str               # GGUF name, e.g. "blk.0.attn_q.weight"
    qtype: str              # one of SUPPORTED
    shape: tuple[int, ...]  # torch order: (out_features, in_features) for matrices, (n,) for vectors
    data: np.ndarray        # memory-mapped, read-only: float32 `shape` for F32, else uint8 (rows, row_bytes)


@dataclass(frozen=True)
class GGUFModel:
    path: str
    arch: str                        # one of ARCHS
    config: LlamaConfig
    rope_neox: bool                  # True: rotate_half halves (qwen2); False: adjacent pairs (llama, mistral)
    tensors: dict[str, GGUFTensor]   # every tensor of the file, checked against `config`
    tokenizer: object                # GGUFBPETokenizer (tokenizer.ggml.model gpt2) or GGUFSpmTokenizer (llama)
    chat_template: str | None
    special_tokens: dict[str, str]   # bos_token / eos_token / unk_token / pad_token, as chat_template_of gives
    tool_template: str | None = None  # tokenizer.chat_template.tool_use: the template for requests with tools


def is_gguf(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path) -> GGUFModel:
    p = Path(path)
    if not p.is_file():
        raise MillisError(f"GGUF model {p} does not exist (or is not a file)")
    if not is_gguf(p):
        raise MillisError(f"{p} is not a GGUF file: it does not start with the magic bytes b'GGUF'")
    with open(p, "rb") as f:  # the map outlives the file object; the arrays keep it alive
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        meta, infos, data_start = _parse(buf)
    except (struct.error, UnicodeDecodeError, KeyError, ValueError, OverflowError, MemoryError) as e:
        raise MillisError(f"{p} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise MillisError(f"{p}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    tensors = {name: _tensor(p, buf, name, dims, tid, data_start + off) for name, dims, tid, off in infos}
    check_disjoint(p, tensors, {name: data_start + off for name, _, _, off in infos})
    cfg = _config(p, meta, arch, tensors)
    _check_tensors(p, cfg, tensors)
    tok, special = tokenizer_of(p, meta, cfg.vocab_size)
    template, tool = (meta.get(k) for k in ("tokenizer.chat_template", "tokenizer.chat_template.tool_use"))
    return GGUFModel(str(p), arch, cfg, arch == "qwen2", tensors, tok,
                     template if isinstance(template, str) and template else None, special,
                     tool if isinstance(tool, str) and tool else None)


def release_pages(a: np.ndarray) -> None:
    """Let the OS drop the resident pages under `a` when it is a view of a GGUF file's map (read-only and
    file-backed: touched again, they are read back from the page cache), so bytes repacked at load do
    not count twice in the process's memory. Anything else is left alone."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer's base
        base = base.obj
    if not isinstance(base, mmap.mmap) or not a.nbytes:
        return
    page, at = mmap.PAGESIZE, a.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    lo, hi = -(-at // page) * page, (at + a.nbytes) // page * page
    if hi > lo:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def dequantize(t: GGUFTensor):
    """fp32 torch tensor of `t.shape`, through gguf.quants (the reference for the native kernels)."""
    import torch
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        raise MillisError("dequantizing GGUF tensors needs the gguf package: pip install gguf==0.19.0") from None
    out = quants.dequantize(t.data, GGMLQuantizationType[t.qtype])
    return torch.from_numpy(np.array(out, dtype=np.float32).reshape(t.shape))


# ---- the file: header, metadata, tensor infos (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)

MAX_DIMS = 4     # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none deeper than 2
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.off = buf, 0

    def take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.off + n > len(self.buf):
            raise ValueError("string past the end of the file")
        self.off += n
        return self.buf[self.off - n:self.off].decode("utf-8")

    def strings(self, n: int) -> list[str]:
        """n strings (a vocabulary, merges: ~100k at load), in one tight loop."""
        buf, off, end, out = self.buf, self.off, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        append = out.append
        for _ in range(n):
            (k,) = length(buf, off)
            off += 8 + k
            if off > end:
                raise ValueError("string past the end of the file")
            append(buf[off - k:off].decode("utf-8"))
        self.off = off
        return out

    def value(self, vtype: int, depth: int = 0):
        if vtype == 8:
            return self.string()
        if vtype == 6:  # f32: the shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06)
            return float(str(np.float32(self.take("<f"))))
        if vtype != 9:
            if vtype not in _SCALARS:
                raise ValueError(f"unknown metadata value type {vtype}")
            return self.take(_SCALARS[vtype])
        etype, n = self.take("<I"), self.take("<Q")
        if depth >= MAX_NESTING:  # each level is a Python call: thousands overflowed the stack
            raise ValueError(f"metadata arrays nested over {MAX_NESTING} deep")
        smallest = 8 if etype in (8, 9) else struct.calcsize(_SCALARS.get(etype, "<B"))  # bytes per item, at least
        if n * smallest > len(self.buf) - self.off:
            raise ValueError(f"an array of {n} items runs past the end of the file")
        if etype == 8:
            return self.strings(n)
        if etype == 9:
            return [self.value(etype, depth + 1) for _ in range(n)]
        if etype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {etype}")
        dt = np.dtype(_SCALARS[etype])
        arr = np.frombuffer(self.buf, dt, n, self.off).copy()  # numeric arrays (scores, token types)
        self.off += n * dt.itemsize
        return arr


def _parse(buf) -> tuple[dict, list[tuple[str, list[int], int, int]], int]:
    """(metadata, [(name, dims fastest-first, ggml type id, offset in the data section)], data section start)."""
    c = _Cursor(buf)
    c.off = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (this reader takes little-endian versions 2 and 3)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("<I"))
    infos = []
    align = meta.get("general.alignment", 32)
    if not isinstance(align, (int, np.integer)) or isinstance(align, bool) or align < 1 or align & (align - 1):
        raise ValueError(f"general.alignment {align!r} is not a power of two")
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (GGUF has 1 to {MAX_DIMS})")
        dims = [c.take("<Q") for _ in range(n_dims)]
        if min(dims) < 1:
            raise ValueError(f"tensor {name} has a dimension of 0: {dims}")
        tid, off = c.take("<I"), c.take("<Q")
        if off % align:
            raise ValueError(f"tensor {name}'s data offset {off} is not a multiple of the alignment {align}")
        infos.append((name, dims, tid, off))
    return meta, infos, -(-c.off // int(align)) * int(align)


def check_disjoint(path: Path, tensors: dict[str, GGUFTensor], starts: dict[str, int]) -> None:
    """No two tensors' bytes overlap (llama.cpp refuses such a file; read as is, a tensor is another's bytes)."""
    spans = sorted((starts[n], starts[n] + t.data.nbytes, n) for n, t in tensors.items())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise MillisError(f"{path} is corrupt: tensor {b}'s data overlaps tensor {a}'s")


def _tensor(path: Path, buf, name: str, dims: list[int], tid: int, start: int) -> GGUFTensor:
    qtype = GGML_TYPES.get(tid, f"ggml type {tid}")
    if qtype not in SUPPORTED:
        raise MillisError(f"{path}: tensor {name} has type {qtype}, which millis does not read; "
                          f"supported: {', '.join(SUPPORTED)} (re-quantize the model to one of them)")
    shape = tuple(int(d) for d in reversed(dims))
    cols, n = shape[-1], math.prod(shape)  # Python ints: np.prod wrapped past 2^63
    block, block_bytes = BLOCKS[qtype]
    if cols % block:
        raise MillisError(f"{path}: tensor {name} has rows of {cols} values, not whole {qtype} blocks of {block}")
    rows, row_bytes = n // cols, cols // block * block_bytes
    if start + rows * row_bytes > len(buf):
        raise MillisError(f"{path} is truncated: tensor {name} ends past the end of the file")
    if qtype == "F32":
        data = np.frombuffer(buf, np.float32, n, start).reshape(shape)
    else:
        data = np.frombuffer(buf, np.uint8, rows * row_bytes, start).reshape(rows, row_bytes)
    return GGUFTensor(name, qtype, shape, data)


# ---- the model's shape


def _config(path: Path, meta: dict, arch: str, tensors: dict[str, GGUFTensor]) -> LlamaConfig:
    def get(key: str, default=KeyError):
        v = meta.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise MillisError(f"{path}: metadata {arch}.{key} is missing")
        return v

    def size(key: str, default=KeyError, least: int = 1) -> int:
        """A count or size of the model: one integer of at least `least` (a per-layer array: not supported)."""
        v = get(key, default)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < least:
            kind = "per-layer values (not supported)" if isinstance(v, (list, np.ndarray)) else repr(v)
            raise MillisError(f"{path}: metadata {arch}.{key} is {kind}; an integer >= {least} is needed")
        return int(v)

    if "token_embd.weight" not in tensors:
        raise MillisError(f"{path}: tensor token_embd.weight is missing")
    dim, n_heads = size("embedding_length"), size("attention.head_count")
    head_dim = size("attention.key_length", dim // n_heads)
    rope_dims = size("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise MillisError(f"{path}: RoPE on {rope_dims} of {head_dim} head dims (partial rotary) is not supported")
    theta = float(get("rope.freq_base", 10000.0))
    return LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0], dim=dim, n_layers=size("block_count"),
        n_heads=n_heads, n_kv_heads=size("attention.head_count_kv", n_heads), max_seq=size("context_length"),
        tie_head="output.weight" not in tensors, bos_id=opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        eos_id=opt_int(meta.get("tokenizer.ggml.eos_token_id")), stop_ids=end_of_generation_ids(meta),
        hidden_dim=size("feed_forward_length"),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        sliding_window=swa(arch, size("attention.sliding_window", 0, least=0)),
        head_dim_override=head_dim if head_dim != dim // n_heads else 0,
        **_rope_scaling(path, meta, arch, tensors, theta, head_dim))


def swa(arch: str, window: int) -> int:
    """The attention window a file's `{arch}.attention.sliding_window` sets: Mistral's; llama.cpp's llama and qwen2
    graphs never read the key (nor do transformers' Llama, or Qwen2 without use_sliding_window): full attention."""
    return window if arch == "mistral" else 0


# control tokens llama.cpp ends generation at by their text (llama-vocab.cpp's end-of-generation set), beside the
# tokenizer.ggml.eos / eot / eom ids: an Instruct model's end of turn is often one of these, not its EOS
END_OF_TURN_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                               "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
                               "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>"})


def end_of_generation_ids(meta: dict) -> tuple[int, ...]:
    """The ids besides EOS that end generation, as llama.cpp ends it: the eot / eom ids, and control tokens
    spelled as an end of turn."""
    eos = opt_int(meta.get("tokenizer.ggml.eos_token_id"))
    ids = [opt_int(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("eot", "eom")]
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")  # (arrays, maybe)
    tokens, types = ([], []) if tokens is None or types is None else (tokens, types)
    ids += [i for i, (t, k) in enumerate(zip(tokens, types)) if int(k) == CONTROL and t in END_OF_TURN_TEXTS]
    return tuple(dict.fromkeys(i for i in ids if i is not None and i != eos))


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float = 1.0, high: float = 4.0,
                        original_max_seq: int = 8192) -> np.ndarray:
    """(head_dim // 2,) divisors of the RoPE frequencies, as llama.cpp's converter writes rope_freqs.weight."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (original_max_seq / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original_max_seq / high, 1.0, np.where(wavelen > original_max_seq / low, factor, mid))


def _rope_scaling(path: Path, meta: dict, arch: str, tensors: dict, theta: float, head_dim: int) -> dict:
    """LlamaConfig's rope_* fields: linear from metadata; Llama 3 from the rope_freqs.weight tensor (the
    converter stores the per-frequency divisors, not the parameters: they are matched against Llama 3.1's)."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 0) or meta.get(f"{arch}.rope.scale_linear", 0) or 1)
    if kind == "linear" or (kind == "none" and factor != 1):
        if "rope_freqs.weight" in tensors and not np.all(tensors["rope_freqs.weight"].data == 1):
            # llama.cpp divides by both: a merged file of two schemes, which millis does not run
            raise MillisError(f"{path}: linear RoPE scaling x{factor:g} with a rope_freqs.weight tensor (Llama 3's "
                              f"scaling) too: one scheme or the other is supported")
        return {"rope_type": "linear", "rope_factor": factor}
    if kind != "none":
        raise MillisError(f"{path}: RoPE scaling {kind!r} is not supported (supported: linear, llama3)")
    if "rope_freqs.weight" not in tensors:
        return {}
    freqs = tensors["rope_freqs.weight"].data.astype(np.float64)
    if freqs.shape != (head_dim // 2,) or tensors["rope_freqs.weight"].qtype != "F32":
        raise MillisError(f"{path}: rope_freqs.weight should be F32 of {head_dim // 2} values")
    if np.allclose(freqs, 1.0):
        return {}
    factor = float(freqs.max())
    if not np.allclose(freqs, llama3_rope_factors(theta, head_dim, factor), rtol=1e-3):
        raise MillisError(f"{path}: rope_freqs.weight is not Llama 3 RoPE scaling (low 1, high 4, original "
                          f"context 8192, factor {factor:g}); other per-frequency factors are not supported")
    return {"rope_type": "llama3", "rope_factor": factor}


def expected_shapes(cfg: LlamaConfig, has_output: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family GGUF must hold, with its torch shape (rope_freqs.weight is optional)."""
    hd, d, f = cfg.head_dim, cfg.dim, cfg.hidden_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    want = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if has_output:
        want["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        want |= {b + "attn_norm.weight": (d,), b + "attn_q.weight": (q, d), b + "attn_k.weight": (kv, d),
                 b + "attn_v.weight": (kv, d), b + "attn_output.weight": (d, q), b + "ffn_norm.weight": (d,),
                 b + "ffn_gate.weight": (f, d), b + "ffn_up.weight": (f, d), b + "ffn_down.weight": (d, f)}
        if cfg.qkv_bias:
            want |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
    return want


def _check_tensors(path: Path, cfg: LlamaConfig, tensors: dict[str, GGUFTensor]) -> None:
    want = expected_shapes(cfg, "output.weight" in tensors)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise MillisError(f"{path}: {len(missing)} tensors are missing: {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}")
    wrong = [f"{n} is {tensors[n].shape}, expected {s}" for n, s in want.items() if tensors[n].shape != s]
    if wrong:
        raise MillisError(f"{path}: tensor shapes disagree with the metadata: {'; '.join(wrong[:4])}")
    extra = sorted(set(tensors) - set(want) - {"rope_freqs.weight"})
    if extra:  # e.g. attn_output biases: a Llama without them would silently compute something else
        raise MillisError(f"{path}: tensors this Llama-family reader does not use: {', '.join(extra[:6])}")


# ---- the tokenizer

# tokenizer.ggml.pre -> how byte-level BPE splits text before merging, as llama.cpp's llama-vocab.cpp
# (regexes as the HF tokenizer.json of those models). None: ByteLevel's own GPT-2 regex.

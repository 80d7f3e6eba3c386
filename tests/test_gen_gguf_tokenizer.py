"""Control and user-defined tokens spelled outside GPT-2's byte alphabet (DeepSeek-R1-Distill's "<｜User｜>",
fullwidth bars and U+2581) in tiny GGUFs written by gguf.GGUFWriter. References: for byte-level BPE, the
`tokenizers` library over a tokenizer.json laid out as the model's own (vocabulary, then added_tokens by
their raw text); for SentencePiece, llama.cpp's rule (tokenizer_st_partition matches the raw text of
control and user-defined tokens before spaces become `▁`; token_to_piece gives a user-defined token's
raw text), as expected ids."""
import dataclasses
import json
import random

import pytest

from gguf_fixtures import GPT2_MERGES, GPT2_SPECIAL, gpt2_vocab, random_llama_tensors, write_tiny_gguf
from millis.gen.config import LlamaConfig
from millis.gen.gguf import read_gguf

TINY = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=128, hidden_dim=96,
                   bos_id=1, eos_id=2)
CONTROL, USER_DEFINED = 3, 4
# typed as llama.cpp's converter types DeepSeek-R1-Distill-Qwen's added tokens ("<｜...｜>" and "<|...|>" look
# special: control); "<tool call>" stands for a user-defined token whose `▁` the converter turned into a space
DEEPSEEK = [("<｜end▁of▁sentence｜>", CONTROL), ("<｜User｜>", CONTROL), ("<｜Assistant｜>", CONTROL),
            ("<｜begin▁of▁sentence｜>", CONTROL), ("<|EOT|>", CONTROL), ("<think>", USER_DEFINED),
            ("</think>", USER_DEFINED), ("<tool call>", USER_DEFINED)]
# DeepSeek-R1-Distill-Qwen's tokenizer.json pre-tokenizer regex (llama.cpp: deepseek-r1-qwen)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "ds.gguf"
    write_tiny_gguf(path, TINY, random_llama_tensors(TINY), pre="deepseek-r1-qwen", added=DEEPSEEK)
    return read_gguf(path).tokenizer


def reference():
    """The tokenizer.json of the fixture's model, laid out as DeepSeek-R1-Distill-Qwen's: the BPE vocabulary
    in byte-alphabet spelling, then the added tokens by raw text (those past the vocabulary get the next
    ids, as the file lists them)."""
    from tokenizers import Tokenizer

    tokens, types, _ = gpt2_vocab(TINY.vocab_size, DEEPSEEK)
    n = TINY.vocab_size - len(DEEPSEEK)
    added = [(i, t, True) for i, t in enumerate(GPT2_SPECIAL)]
    added += [(n + j, t, k == CONTROL) for j, (t, k) in enumerate(DEEPSEEK)]
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": sp} for i, t, sp in added],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens[:n])},
                      "merges": GPT2_MERGES}}
    ref = Tokenizer.from_str(json.dumps(spec))
    assert [ref.token_to_id(t) for t, _ in DEEPSEEK] == list(range(n, TINY.vocab_size))
    return ref


def test_bpe_control_tokens_outside_the_byte_alphabet_are_single_ids(deepseek):
    tokens, _, _ = gpt2_vocab(TINY.vocab_size, DEEPSEEK)
    bos, user, assistant = (tokens.index(t) for t in ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"))
    h, i = tokens.index("h"), tokens.index("i")
    # a rendered DeepSeek-R1-Distill chat prompt: the model sees its turn markers
    ids = deepseek.encode("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>", special=False)
    assert ids == [bos, user, h, i, assistant]
    assert deepseek.decode([user, h, i, assistant]) == "hi"  # control tokens: skipped, as <|im_start|> is
    assert deepseek.decode([1, h, i, 2]) == "hi"
    think, tool = tokens.index("<think>"), tokens.index("<tool call>")
    assert deepseek.encode("<think>hi</think>", special=False) == [think, h, i, tokens.index("</think>")]
    assert deepseek.encode("a<tool call>b", special=False) == [tokens.index("a"), tool, tokens.index("b")]
    assert deepseek.decode([think, h, i, tool]) == "<think>hi<tool call>"  # user-defined: their raw text


def test_bpe_matches_the_models_tokenizer_json(deepseek):
    ref = reference()
    rng = random.Random(0)
    pieces = [t for t, _ in DEEPSEEK] + list("hi the a1 2\n\t日é😀｜▁<>|") + [
        " the", "  ", "<｜User", "｜>", "<｜begin of sentence｜>", "<tool", "call>", "<|im_start|>", "<|im_end|>"]
    texts = ["Hello, world!", "  leading and 123 trailing  ", "héllo 日本語 😀"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 20))) for _ in range(300)]
    for s in texts:
        ids = deepseek.encode(s, special=False)
        assert ids == ref.encode(s, add_special_tokens=False).ids, s
        assert deepseek.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
        if not any(t in s for t, k in DEEPSEEK if k == CONTROL) and "<|im_" not in s and "<|endoftext|>" not in s:
            assert deepseek.decode(ids) == s


def test_spm_control_and_user_defined_tokens_match_their_raw_text(tmp_path):
    added = [("<｜begin▁of▁sentence｜>", CONTROL), ("<x▁y>", USER_DEFINED)]
    cfg = dataclasses.replace(TINY, vocab_size=336)  # room past the 319 pieces
    write_tiny_gguf(tmp_path / "s.gguf", cfg, random_llama_tensors(cfg), tokenizer="llama", added=added)
    tok = read_gguf(tmp_path / "s.gguf").tokenizer
    ctrl, user = cfg.vocab_size - 2, cfg.vocab_size - 1
    sp, h, i = tok.ids[" "], tok.ids["h"], tok.ids["i"]
    # each stretch after a whole token gets the dummy-prefix space, as for [INST]
    assert tok.encode("<｜begin▁of▁sentence｜>hi", special=False) == [ctrl, sp, h, i]
    assert tok.encode("hi<x▁y>", special=False) == [sp, h, i, user]
    assert ctrl not in tok.encode("<｜begin of sentence｜>", special=False)  # spaces are not its `▁`
    assert user not in tok.encode("<x y>", special=False)
    assert tok.decode([ctrl, h, i]) == "hi" and tok.decode([h, i, user]) == "hi<x▁y>"  # raw, as llama.cpp
    assert tok.decode(tok.encode("hi<x▁y>")) == "hi<x▁y>"


def test_spm_literal_metaspace_is_a_space_and_unk_text_is_the_unknown_token(tmp_path):
    write_tiny_gguf(tmp_path / "s.gguf", TINY, random_llama_tensors(TINY), tokenizer="llama")
    tok = read_gguf(tmp_path / "s.gguf").tokenizer
    # as transformers' GGUF tokenizer (and llama.cpp, which escapes spaces to ▁ first): were 3 byte pieces for ▁
    assert tok.encode("the\u2581cat", special=False) == tok.encode("the cat", special=False)
    assert tok.encode("a\u2581\u2581b", special=False) == tok.encode("a  b", special=False)
    assert tok.decode(tok.encode("the\u2581cat")) == "the cat"
    unk = tok.ids["<unk>"] if "<unk>" in tok.ids else 0
    assert tok.encode("<unk>", special=False) == [unk]  # was spelled out character by character
    assert unk in tok.encode("the<unk>the", special=False)


def test_llama_cpps_pre_tokenizer_names_and_a_file_without_one(tmp_path):
    """"gpt-2" (the name llama.cpp's converter writes) and its other names of the GPT-2 pattern are read; a file
    without tokenizer.ggml.pre (converted before spring 2024) takes the pattern its vocabulary is known by
    (Llama 3's and Qwen2's special tokens), else GPT-2's with a warning, as llama.cpp warns."""
    from millis.gen.gguf_tokenizer import guessed_pre

    text = "In 2024, 12345 people\n\n\nsaid  hi"
    ids = {}
    for pre in ("gpt-2", "default", ""):
        path = tmp_path / f"{pre or 'none'}.gguf"
        write_tiny_gguf(path, TINY, random_llama_tensors(TINY), pre=pre)
        if pre:
            ids[pre] = read_gguf(path).tokenizer.encode(text)
        else:
            with pytest.warns(UserWarning, match="no tokenizer.ggml.pre"):
                ids[pre] = read_gguf(path).tokenizer.encode(text)
    assert ids["gpt-2"] == ids["default"] == ids[""]
    llama3 = ["x"] * 128000 + ["<|begin_of_text|>"]
    qwen = ["x"] * 151644 + ["<|im_start|>"]
    assert guessed_pre("m", llama3) == "llama-bpe" and guessed_pre("m", qwen) == "qwen2"


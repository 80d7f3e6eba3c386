"""Tokenizers from GGUF metadata: byte-level BPE (`tokenizer.ggml.model` gpt2, with the pre-tokenizer
llama.cpp names in `tokenizer.ggml.pre`) and SentencePiece BPE (`llama`), as llama.cpp reads them."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from millis.common.errors import MillisError
from millis.gen.tokenizer import HFTokenizer, Llama2cTokenizer, byte_alphabet  # noqa: F401 -- read from here too

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type values


def opt_int(v) -> int | None:
    return None if v is None else int(v)


_GPT2 = None
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS = "digits"  # each digit alone, then the GPT-2 regex (SmolLM2's tokenizer.json: Digits + ByteLevel)
PRE_TOKENIZERS = {
    # llama.cpp's names for the GPT-2 pattern ("gpt-2" is what its converter writes)
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
                     "a.x-4.0", "mellum", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
}
# llama.cpp matches a whole pre-token against the vocabulary before merging for these (HF: ignore_merges)
IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")




def guessed_pre(path, tokens: list[str]) -> str:
    """A byte-level GGUF without tokenizer.ggml.pre (converted before llama.cpp wrote it, spring 2024): the
    vocabularies known by their special tokens (Llama 3's <|begin_of_text|> after 128,000 tokens, Qwen2's
    <|im_start|> at 151,644) get their own pattern, as their tokenizer.json has it; any other the GPT-2 one, with
    a warning, as llama.cpp warns (its digits, spaces and newlines may split otherwise than the model's own)."""
    if len(tokens) > 128000 and tokens[128000] == "<|begin_of_text|>":
        return "llama-bpe"
    if len(tokens) > 151644 and tokens[151644] == "<|im_start|>":
        return "qwen2"
    warnings.warn(f"{path}: no tokenizer.ggml.pre: the GPT-2 pre-tokenizer is used, which may split text otherwise "
                  f"than the model's own (llama.cpp: 'GENERATION QUALITY WILL BE DEGRADED'); convert the model again "
                  f"with a current llama.cpp")
    return "default"


class GGUFBPETokenizer(HFTokenizer):
    """HFTokenizer over a `tokenizers.Tokenizer` built from GGUF metadata (HFTokenizer reads a file)."""

    def __init__(self, tok, eos_id: int | None) -> None:  # not super().__init__: there is no file to read
        self._tok, self.eos_id = tok, eos_id


class GGUFSpmTokenizer(Llama2cTokenizer):
    """llama.cpp's SentencePiece BPE (tokenizer.ggml.model llama) on Llama2cTokenizer's merge loop, with
    the file's <unk>/BOS/EOS ids and <0xXX> byte ids; control, user-defined and unknown (<unk>) tokens in the
    text are matched whole by their raw text (`▁` kept, as llama.cpp matches them before escaping spaces), a
    literal ▁ elsewhere is a space, and only normal pieces are merged into. Each stretch of text between them gets the dummy-prefix space,
    even one that starts with a space (SentencePiece, llama.cpp and Llama 2's own tokenizer.json;
    transformers' GGUF converter adds it at the start only, and not before a space)."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], unk: int, bos: int | None,
                 eos: int | None, add_bos: bool, add_space_prefix: bool) -> None:
        super().__init__([t.replace("\u2581", " ") for t in tokens],
                         [s if t == NORMAL else -1e30 for s, t in zip(scores, types)])
        self.raw = tokens
        self.UNK, self.BOS, self.EOS, self.eos_id = unk, bos, eos, eos  # instance ids shadow llama2.c's 0/1/2
        self.types, self.add_bos, self.add_space_prefix = types, add_bos and bos is not None, add_space_prefix
        self.byte_ids = {int(m.group(1), 16): i for i, p in enumerate(tokens) if types[i] == BYTE
                         and (m := re.match(r"^<0x([0-9A-Fa-f]{2})>$", p))}
        # <unk> too: llama.cpp's special-token pass matches CONTROL, USER_DEFINED and UNKNOWN tokens' text
        self.whole_ids = {p: i for i, (p, t) in enumerate(zip(tokens, types))
                          if t in (CONTROL, USER_DEFINED, UNKNOWN) and p}
        whole = sorted(self.whole_ids, key=len, reverse=True)
        self.whole = re.compile("(" + "|".join(map(re.escape, whole)) + ")") if whole else None

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids = [self.BOS] if special and self.add_bos else []
        parts = self.whole.split(text) if self.whole else [text]
        for k, part in enumerate(parts):
            if k % 2:  # a matched control / user-defined token
                ids.append(self.whole_ids[part])
            elif part:  # a literal ▁ is a space, as llama.cpp escapes spaces to ▁ before it merges
                part = part.replace("\u2581", " ")
                ids += self._merge(self.symbols(" " + part if self.add_space_prefix else part))
        return ids

    def symbols(self, text: str) -> list[int]:
        toks = []
        for ch in text:
            if ch in self.ids and self.types[self.ids[ch]] == NORMAL:
                toks.append(self.ids[ch])
            elif len(self.byte_ids) == 256:  # byte fallback: one <0xXX> piece per UTF-8 byte
                toks.extend(self.byte_ids[b] for b in ch.encode("utf-8"))
            else:
                toks.append(self.UNK)
        return toks

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i adds to a text (logprobs' `bytes`): a <0xXX> piece its byte, control tokens none."""
        t = self.types[i] if 0 <= i < len(self.pieces) else UNKNOWN
        if t in (CONTROL, UNKNOWN):
            return b""
        m = re.match(r"^<0x([0-9A-Fa-f]{2})>$", self.pieces[i]) if t == BYTE else None
        return bytes([int(m.group(1), 16)]) if m else (self.raw[i] if t == USER_DEFINED else self.pieces[i]).encode()

    def decode(self, ids: list[int]) -> str:
        """Control tokens (BOS, EOS...) are skipped, as HFTokenizer skips special tokens; user-defined ones
        are their raw text (llama.cpp); the dummy prefix is taken off the first piece."""
        out, first = bytearray(), True
        for i in ids:
            if (self.types[i] if 0 <= i < len(self.pieces) else UNKNOWN) in (CONTROL, UNKNOWN):
                continue
            raw = self.token_bytes(i)
            if first and self.add_space_prefix and raw.startswith(b" "):
                raw = raw[1:]
            first = False
            out += raw
        return out.decode("utf-8", errors="replace")


def tokenizer_of(path: Path, meta: dict, n_rows: int):
    """(tokenizer, special token strings) from the tokenizer.ggml.* metadata."""
    model, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if model is None:
        raise MillisError(f"{path} holds no tokenizer (no tokenizer.ggml.model): convert the model with its tokenizer")
    if model not in ("gpt2", "llama"):
        raise MillisError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2 = byte-level "
                          f"BPE, llama = SentencePiece BPE)")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise MillisError(f"{path}: tokenizer.ggml.tokens is missing or not an array of strings")
    if len(tokens) > n_rows:
        raise MillisError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens for an embedding of {n_rows} rows")
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if len(types) != len(tokens) or len(meta.get("tokenizer.ggml.scores", tokens)) != len(tokens):
        raise MillisError(f"{path}: tokenizer.ggml.token_type / scores do not have one entry per token")
    ids = {k: opt_int(meta.get(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown", "padding")}
    for k in ("bos", "eos", "unknown"):
        if ids[k] is not None and not 0 <= ids[k] < len(tokens):
            raise MillisError(f"{path}: tokenizer.ggml.{k}_token_id {ids[k]} is not a token (the vocabulary has "
                              f"{len(tokens)})")
    special = {f"{name}_token": tokens[i] for name, k in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"),
                                                          ("pad", "padding")) if (i := ids[k]) is not None
               and i < len(tokens)}
    # (SentencePiece has no pre-tokenizer: guessing one for it warned of a GPT-2 fallback it never used)
    pre = meta.get("tokenizer.ggml.pre") or (None if model == "llama" else guessed_pre(path, tokens))
    # llama.cpp's defaults when the flag is absent: BOS for SentencePiece and the Llama 3 pre-tokenizer
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama" or pre in IGNORE_MERGES))
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        scores = [0.0] * len(tokens) if scores is None else [float(s) for s in scores]
        tok = GGUFSpmTokenizer(tokens, scores, types, ids["unknown"] or 0, ids["bos"], ids["eos"], add_bos,
                               bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        return tok, special
    if pre not in PRE_TOKENIZERS:
        raise MillisError(f"{path}: byte-level pre-tokenizer tokenizer.ggml.pre={pre!r} is not known; known: "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}")
    if not meta.get("tokenizer.ggml.merges"):  # (llama.cpp refuses it too: every word would be its bytes' tokens)
        raise MillisError(f"{path}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, and this file has none")
    try:
        tok = _byte_level(meta, tokens, types, pre, ids["bos"] if add_bos else None)
    except Exception as e:  # noqa: BLE001 -- the tokenizers library's errors are bare Exceptions
        raise MillisError(f"{path}: the BPE tokenizer cannot be built from tokenizer.ggml.tokens / merges: {e}") from None
    return GGUFBPETokenizer(tok, ids["eos"]), special


def _byte_level(meta: dict, tokens: list[str], types: list[int], pre: str, bos: int | None):
    """A `tokenizers.Tokenizer`: BPE over the file's vocabulary and merges, the pre-tokenizer of `pre`,
    control tokens (type 3) special, user-defined ones (type 4) matched whole, BOS when the file asks."""
    import orjson
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors

    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    # Control and user-defined tokens keep their raw text (e.g. DeepSeek's "<｜User｜>"): llama.cpp and the
    # model's tokenizer.json match them in the text by it, and the tokenizers library finds an added
    # token's id by looking its text up in the vocabulary. Any other token outside the byte alphabet
    # (rare) is respelled byte by byte, as transformers' GGUF converter does.
    whole = (CONTROL, USER_DEFINED)
    vocab = {t if k in whole or set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, (t, k) in enumerate(zip(tokens, types))}
    # the BPE model from its JSON form: merges stay "a b" strings, parsed in Rust (a Python split of ~50k
    # merges into pairs cost 0.15 s of the server's start)
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
           "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab, "merges": list(meta.get("tokenizer.ggml.merges", []))}
    if any(m.count(" ") != 1 for m in bpe["merges"]):  # a piece with a space in it: pairs, split at the first
        bpe["merges"] = [m.split(" ", 1) for m in bpe["merges"]]
    tok = Tokenizer.from_str(orjson.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                                           "normalizer": None, "pre_tokenizer": None, "post_processor": None,
                                           "decoder": None, "model": bpe}).decode())
    split = PRE_TOKENIZERS[pre]
    if split in (_GPT2, _DIGITS):
        bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]) \
            if split == _DIGITS else bl
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # every one, whatever its characters (transformers' GGUF loader skips those outside the byte alphabet:
    # DeepSeek-R1-Distill's turn markers would be tokenized as bytes and decoded as text)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                    if k == USER_DEFINED])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=[tokens[bos], "$A"],
                                                           pair=[tokens[bos], "$A", tokens[bos], "$B"],
                                                           special_tokens=[(tokens[bos], bos)])
    return tok

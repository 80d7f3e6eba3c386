"""Constrained decoding: a request's tokens kept inside a grammar (JSON Schema) by llguidance.

Chosen by measurement (`bench/grammar_engines.py` on SmolLM2's 49,152-token vocabulary): llguidance
compiles a JSON schema in 1-2 ms and computes a token mask in about 0.2 ms; outlines-core took about
1 s to compile and 0.9 ms per mask; xgrammar requires triton and transformers at install.

    g = Grammars(tokenizer, vocab_size, eos_id, end_ids)  # once per engine (builds the token trie)
    m = g.matcher(json_schema_grammar({"type": "object"}))   # per request (compiled grammars are cached)
    allow_only(m, logits_row)                               # before sampling: disallowed tokens -> -inf
    m.consume_token(t)                                      # after; m.is_stopped(): nothing may follow

Grammar strings are what `json_schema_grammar` returns (llguidance's JSON grammar form); requests carry
them in SamplingParams.grammar, so they are hashable and cheap to compare.
"""
from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict

import numpy as np

from millis.common.errors import MillisError

# Whitespace between JSON tokens: some, as models write it, but bounded so a model cannot spend its
# whole budget on blank lines (the commonest constrained-JSON failure).
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,12}",
                "item_separator": ",", "key_separator": ":"}
# JSON exactly as json.dumps (and chat templates' tojson) writes it: for call syntaxes a model was trained on
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 64      # compiled grammars kept per engine (a schema sent again is a deep copy)
MAX_SCHEMA_CHARS = 65536  # a schema larger than this is refused before compiling
MAX_ERROR_CHARS = 2000    # of a compile error in an answer (llguidance quotes the grammar: 68 KB for a large schema)


def json_schema_grammar(schema: dict | bool | None, options: dict = JSON_OPTIONS) -> str:
    """The grammar for a JSON value valid under `schema` (None: any JSON object, OpenAI's json_object)."""
    from llguidance import LLMatcher

    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (dict, bool)):
        raise MillisError(f"a JSON schema must be an object, got {type(schema).__name__}")
    text = schema_text(schema)
    try:
        return LLMatcher.grammar_from_json_schema(text, overrides=options)
    except ValueError as e:
        raise MillisError(f"invalid JSON schema: {e}") from None


def lark_grammar(text: str) -> str:
    """A grammar in llguidance's Lark syntax (JSON values inside it as `json_rule(schema)`). Checked when it is
    compiled (Grammars.matcher: a server does that off its event loop; checking here too cost a tools request
    26 ms of the loop with 60 patterned tools)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(text)


def json_rule(schema: dict, options: dict = JSON_OPTIONS) -> str:
    """A Lark rule body for a JSON value valid under `schema` (whitespace as json_schema_grammar's)."""
    return f"%json {schema_text({**schema, 'x-guidance': options})}"


def schema_text(schema: dict | bool) -> str:
    """`schema` as JSON text, refused when it is too large or too deep to compile, or when a grammar cannot keep
    its numeric bounds (check_bounds)."""
    try:
        text = json.dumps(schema)
        for node in schema_nodes(schema):
            check_bounds(node)
            check_intersections(node)
    except RecursionError:  # the servers refuse deep schemas before this; other callers may not
        raise MillisError("the JSON schema nests too deeply") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise MillisError(f"the JSON schema has {len(text)} characters; at most {MAX_SCHEMA_CHARS}")
    return text


MAX_INTERSECTED_PATTERNS = 8  # string patterns one value must match at once (allOf): checking them is exponential


def schema_nodes(schema):
    """Every object of a JSON schema that may be a schema (not the values of const, enum, default, examples),
    innermost first."""
    if isinstance(schema, list):
        for s in schema:
            yield from schema_nodes(s)
    elif isinstance(schema, dict):
        for k, v in schema.items():
            if k not in NOT_SCHEMAS:
                yield from schema_nodes(v)
        yield schema


def check_intersections(schema: dict) -> None:
    """Refuse more than MAX_INTERSECTED_PATTERNS regular expressions (`pattern`, `format`) that one string must
    match at once (an allOf's members, nested allOf flattened): llguidance checks their intersection for emptiness
    in time exponential in their count (12: 0.01 s, 18: 5 s, 22: 225 s of a compile thread, a 900-character
    schema), and no parser limit bounds that check. One object of the schema (schema_nodes)."""
    if "allOf" in schema and (n := patterns_met(schema)) > MAX_INTERSECTED_PATTERNS:
        raise MillisError(f"the JSON schema asks one value to match {n} string patterns at once (allOf); at most "
                          f"{MAX_INTERSECTED_PATTERNS}: checking their intersection takes time exponential in "
                          f"their count")


def patterns_met(schema) -> int:
    """The `pattern` / `format` constraints a value of `schema` must meet at once: its own and its allOf's."""
    if not isinstance(schema, dict):
        return 0
    own = ("pattern" in schema) + ("format" in schema)
    members = schema.get("allOf")
    return own + (sum(patterns_met(m) for m in members) if isinstance(members, list) else 0)


EXACT_INTEGERS = 2 ** 53  # llguidance reads bounds as doubles: integers past this one are rounded
NOT_SCHEMAS = ("const", "enum", "default", "examples")  # values, not schemas


def check_bounds(schema: dict) -> None:
    """Refuse numeric bounds a grammar over doubles cannot keep. llguidance compares with each bound as a double,
    a validator with the exact value: an integer bound past 2^53 is rounded (minimum 2^53 + 1 allowed 2^53), and
    exclusive bounds with no double between them let only values that parse back to a bound through. One object
    of the schema (schema_nodes)."""
    number = {k: v for k, v in schema.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")}
    for key, v in number.items():
        if isinstance(v, int) and abs(v) > EXACT_INTEGERS:
            raise MillisError(f"the JSON schema's {key} {v} is past 2^53, beyond what a double holds exactly")
    lows = [float(number["minimum"])] if "minimum" in number else []
    lows += [math.nextafter(float(number["exclusiveMinimum"]), math.inf)] if "exclusiveMinimum" in number else []
    highs = [float(number["maximum"])] if "maximum" in number else []
    highs += [math.nextafter(float(number["exclusiveMaximum"]), -math.inf)] if "exclusiveMaximum" in number else []
    if lows and highs and max(lows) > min(highs):
        raise MillisError(f"the JSON schema's bounds {number} leave no number (as a double) between them")


def _spm_tokens(tok, n: int) -> list[bytes]:
    """Each id's bytes for a SentencePiece-style tokenizer (llama2.c / GGUF `llama`): <0xXX> pieces are
    one byte; BOS, EOS, <unk> and control pieces are special (0xFF-prefixed, as llguidance marks them)."""
    types = getattr(tok, "types", None)
    special = {tok.UNK, tok.BOS, tok.EOS}
    out = []
    for i, p in enumerate(tok.pieces):
        m = re.match(r"^<0x([0-9A-Fa-f]{2})>$", p)
        if m:
            out.append(bytes([int(m.group(1), 16)]))
        elif i in special or (types is not None and types[i] == 3):  # 3: CONTROL
            out.append(b"\xff" + p.encode())
        else:
            out.append(p.encode())
    return out + [b""] * (n - len(out))


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS ids and an encode callable."""

    def __init__(self, tok, n: int, eos: int) -> None:
        self.tok, self.tokens, self.eos_token_id = tok, _spm_tokens(tok, n), eos
        self.bos_token_id = getattr(tok, "BOS", None)
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t[:1] == b"\xff"]

    def __call__(self, s: str) -> list[int]:
        """`s` alone, without BOS or the dummy-prefix space (llguidance tokenizes grammar text with it)."""
        ids = self.tok.symbols(s)
        if not hasattr(self.tok, "add_space_prefix") and " " in self.tok.ids:  # llama2.c: symbols() adds it
            ids = ids[1:]
        return self.tok._merge(ids)


def added_text(inner, n: int, end_ids=()) -> dict[int, str]:
    """{id: its text} of a `tokenizers.Tokenizer`'s added tokens that are not special (`"special": false` in
    tokenizer.json's added_tokens; GGUF's user-defined tokens): Qwen2.5's, Hermes' and SmolLM3's `<tool_call>`,
    `</tool_call>`, `<think>`. They are text: the tokenizer finds them in text, decoding writes them. Not a token
    that ends generation (`end_ids`, or one spelled as an end of turn): as text a grammar could allow it inside a
    value, and the answer would end there."""
    from millis.gen.gguf import END_OF_TURN_TEXTS

    return {i: t.content for i, t in inner.get_added_tokens_decoder().items()
            if not t.special and t.content and 0 <= i < n and i not in end_ids and t.content not in END_OF_TURN_TEXTS}


def decoded_bytes(inner, content: str) -> bytes | None:
    """An added token's bytes as decoding writes them: its content through the tokenizer's decoder (Metaspace's `▁`
    a space, byte-level's `Ġ` a space), after a plain `a` so that a decoder's Strip of the text's first space does
    not take the token's. None where that is not valid UTF-8 (a byte-level content naming a lone byte: its bytes
    are not its text)."""
    if inner.decoder is None:
        return content.encode()
    out = inner.decoder.decode(["a", content])
    return out[1:].encode() if out[:1] == "a" and "\ufffd" not in out[1:] else None


def text_tokens(inner, loaded, added: dict[int, str]) -> dict[int, bytes]:
    """{id: its bytes} of the added tokens that are not special (`added`: added_text's) but that llguidance's loader
    (`loaded`) made special: the only ones whose bytes it got wrong. Its loader (toktrie_hf_tokenizers, 1.9.1)
    makes special an added token spelled `<...>` (`<tool_call>`, `"special": false` or not) and gives every
    other one the bytes its decoding writes (Metaspace's `▁▁` two spaces, a byte-level `ü` reusing the id of byte
    0xFC that byte): those stay as loaded."""
    text = {i: decoded_bytes(inner, c) for i, c in added.items() if loaded.is_special_token(i)}
    return {i: b for i, b in text.items() if b}


class _AddedAsText:
    """What TokenizerWrapper reads, for a `tokenizers.Tokenizer` with added tokens that are not special but which
    llguidance's own loader made special (text_tokens): each id's bytes as that loader gives them (`loaded`, built
    from the tokenizer's JSON), but those tokens' bytes their text. Special, they were 0xFF-prefixed (no grammar's
    text can be written with one) while the loader tokenizes a grammar's text with the tokenizer, which finds them
    in it: a forced `<tool_call>` came out as the one token the grammar's bytes could not take (GrammarFailed), and
    free text could not hold it. Text is tokenized by `loaded` itself: the tokenizer without a post-processor's
    tokens (BOS) and, as llguidance's loader has it, without a `Prepend("▁")` normalizer or a Metaspace
    pre-tokenizer's prefix space (the tokenizer's own encode put a `▁` before every grammar's text: with a Llama-2
    or Mistral tokenizer.json every grammar failed on its first token)."""

    def __init__(self, loaded, text: dict[int, bytes], n: int, eos: int) -> None:
        self.loaded, self.eos_token_id, self.bos_token_id = loaded, eos, None
        self.special_token_ids = [i for i in range(n) if i not in text and loaded.is_special_token(i)]
        self.tokens = [text.get(i) or loaded.decode_bytes([i]) for i in range(n)]
        for i in self.special_token_ids:  # decode_bytes gives a special token's name without its 0xFF
            self.tokens[i] = b"\xff" + self.tokens[i]

    def __call__(self, s: str) -> list[int]:
        return self.loaded.tokenize_str(s)


class Grammars:
    """llguidance's view of one engine's tokenizer, and the grammars compiled for it (LRU)."""

    def __init__(self, tok, vocab_size: int, eos_id: int | None, end_ids=()) -> None:
        """`end_ids`: the ids besides eos_id that end generation. llguidance takes them all as EOS (allowed where the
        grammar may end, each ending it: Llama 3's `<|eot_id|>` beside its EOS `<|end_of_text|>`, a free answer
        under a strict tool's grammar could only end with EOS, past its model's end of turn), and an added token that
        is not special stays special to llguidance if it is one of them."""
        from llguidance import LLTokenizer, TokenizerWrapper

        if tok is None or eos_id is None:
            raise MillisError("structured output needs the model's tokenizer and an EOS token; this model has "
                              "none")
        ends = [eos_id, *sorted(i for i in set(end_ids) if i != eos_id and 0 <= i < vocab_size)]
        inner = getattr(tok, "_tok", None)  # HF `tokenizers` (HF directories, GGUF byte-level BPE)
        if inner is not None and hasattr(inner, "to_str"):
            if added := added_text(inner, vocab_size, ends):  # llguidance's bytes, then, where it made them special,
                loaded = LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=ends, slices=[])  # text's
                text = text_tokens(inner, loaded, added)
                self.tok = LLTokenizer(TokenizerWrapper(_AddedAsText(loaded, text, vocab_size, eos_id)),
                                       n_vocab=vocab_size, eos_token=ends) if text else \
                    loaded.with_slices(LLTokenizer.general_slices())
            else:
                self.tok = LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=ends)
        elif hasattr(tok, "pieces"):
            self.tok = LLTokenizer(TokenizerWrapper(_Wrapped(tok, vocab_size, eos_id)), n_vocab=vocab_size,
                                   eos_token=ends)
        else:
            raise MillisError(f"structured output is not supported for a {type(tok).__name__} tokenizer")
        self.vocab_size = vocab_size
        # JSON's structural characters must each start some token, or a grammar that forces one cannot go on
        firsts = {self.tok.decode_bytes([i])[:1] for i in range(min(vocab_size, self.tok.vocab_size))}
        self.unspellable = [c for c in '{}[]":,' if c.encode() not in firsts]
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._failed: OrderedDict[str, str] = OrderedDict()  # grammar -> why it did not compile
        self._lock = threading.Lock()  # requests are added from the server's threads

    def matcher(self, grammar: str):
        """A fresh matcher at the grammar's start; MillisError naming the problem when it is invalid."""
        from llguidance import LLMatcher

        if self.unspellable:
            raise MillisError(f"this model's vocabulary has no token for {' '.join(self.unspellable)}: it cannot "
                              f"write JSON")
        with self._lock:
            base = self._compiled.get(grammar)
            if base is not None:
                self._compiled.move_to_end(grammar)
                return base.deep_copy()
            if (error := self._failed.get(grammar)) is not None:  # a retry of a grammar that failed pays nothing
                raise MillisError(error)
        base = LLMatcher(self.tok, grammar, log_level=0)  # outside the lock: 1-1000 ms for a large schema
        if base.is_error():
            error = f"the grammar cannot be used: {base.get_error()[:MAX_ERROR_CHARS]}"
            with self._lock:
                self._failed[grammar] = error
                while len(self._failed) > CACHED_GRAMMARS:
                    self._failed.popitem(last=False)
            raise MillisError(error)
        with self._lock:
            self._compiled[grammar] = base
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return base.deep_copy()


class GrammarFailed(MillisError):
    """The grammar compiled, but decoding cannot follow it (llguidance's parser limits: a schema whose rows
    outgrow them; no token allowed): the request's own input, a 422 naming the field it came from."""


def allow_only(matcher, logits: torch.Tensor) -> None:
    """logits (V,) in place: every token the matcher's grammar does not allow next gets -inf. Where it may end, every
    end id Grammars was given is allowed (llguidance holds them all as EOS) and ends it when consumed."""
    import torch  # here, not at the top: the encoder server imports this module (its OpenAPI) without torch

    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    if matcher.is_error():
        raise GrammarFailed(f"constrained decoding failed: {matcher.get_error()}")
    allowed = np.unpackbits(bits, bitorder="little")[:logits.shape[-1]].astype(bool)
    if not allowed.any():
        raise GrammarFailed("the grammar allows no token here")
    mask = torch.from_numpy(~allowed)
    if mask.shape[0] < logits.shape[-1]:  # rows past the tokenizer's vocabulary (padding): never allowed
        mask = torch.cat([mask, torch.ones(logits.shape[-1] - mask.shape[0], dtype=torch.bool)])
    logits.masked_fill_(mask.to(logits.device), float("-inf"))

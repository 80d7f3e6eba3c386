"""Constrained decoding (millis/gen/grammar.py): every output of a JSON-schema request parses and
validates, sampled or greedy, alone or beside other requests, with byte-level BPE and SentencePiece
vocabularies; unconstrained batch-mates are untouched; a bad schema is a clear error."""
import json

import jsonschema
import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf

from millis.common.errors import MillisError
from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.gen.grammar import json_schema_grammar, lark_grammar

CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=512, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)
SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog", "bird"]}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["kind", "age", "ok", "name", "tags"], "additionalProperties": False}
PROMPT = [1, 40, 41, 42, 43]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_path(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("grammar") / f"tiny-{request.param}.gguf")
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "Q8_0", embed_qtype="Q8_0"), tokenizer=request.param)
    return path


def texts(eng, prompts, params_list) -> list[tuple[str, str]]:
    ids = [eng.add(p, sp) for p, sp in zip(prompts, params_list)]
    got = {i: ["", None] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id][0] += o.text
            if o.finished:
                got[o.id][1] = o.finished
    return [tuple(got[i]) for i in ids]


def test_every_sampled_output_parses_and_validates(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=4, max_seq=512, threads=2))
    g = json_schema_grammar(SCHEMA)
    params = [SamplingParams(max_tokens=300, temperature=1.0, seed=s, grammar=g) for s in range(12)]
    params.append(SamplingParams(max_tokens=300, grammar=g))  # greedy too
    for text, finished in texts(eng, [PROMPT] * len(params), params):
        assert finished == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert not eng.requests and eng.free_slots == eng.max_batch


def test_json_object_is_an_object(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=2, max_seq=512, threads=2))
    g = json_schema_grammar(None)
    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["x"], "additionalProperties": False}
    for text, finished in texts(eng, [PROMPT] * 2, [SamplingParams(max_tokens=400, temperature=0.7, seed=s,
                                                                   grammar=g if s else json_schema_grammar(schema))
                                                    for s in range(2)]):
        if finished == "stop":  # an open object may run to max_tokens on random weights
            assert isinstance(json.loads(text), dict)
        else:
            assert finished == "length" and text.startswith("{")


def test_unconstrained_batch_mates_are_untouched(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=3, max_seq=512, threads=2))
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [[1, 50, 51], [1, 60, 61, 62]]
    want = run_all(eng, prompts, plain)
    g = json_schema_grammar(SCHEMA)
    ids = [eng.add(p, plain) for p in prompts] + [eng.add(PROMPT, SamplingParams(max_tokens=300, grammar=g))]
    got = {i: [] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id] += o.token_ids
    assert [got[i] for i in ids[:2]] == want


def test_greedy_constrained_output_does_not_depend_on_speculation(model_path):
    g = json_schema_grammar(SCHEMA)
    outs = []
    for k in (0, 4):
        eng = open_engine(model_path, EngineConfig(max_batch=2, max_seq=512, threads=2, speculate=k))
        outs.append(texts(eng, [PROMPT], [SamplingParams(max_tokens=300, grammar=g)]))
    assert outs[0] == outs[1]


def test_bad_schemas_are_clear_errors(model_path):
    eng = open_engine(model_path, EngineConfig(max_batch=1, max_seq=512, threads=2))
    with pytest.raises(MillisError, match="grammar cannot be used"):
        eng.add(PROMPT, SamplingParams(grammar=json_schema_grammar({"type": "no-such-type"})))
    with pytest.raises(MillisError, match="must be an object"):
        json_schema_grammar([1, 2])
    assert not eng.requests and not eng.waiting


# An added token that is not special (tokenizer.json `"special": false`, GGUF user-defined) is text to llguidance: its
# own loader makes every added token special (0xFF-prefixed), so a grammar could neither take nor write Qwen2.5's
# `<tool_call>`. A special one stays special; a tokenizer without such tokens is loaded as llguidance loads it.
ADDED_TEXT = [("<tool_call>", 4), ("</tool_call>", 4), ("<think>", 4)]  # 4: USER_DEFINED, the vocabulary's last ids


def byte_level(added=(), vocab_size=CFG.vocab_size):
    """The GGUF byte-level BPE tokenizer (millis.gen.gguf_tokenizer) of the tiny vocabulary with `added` tokens."""
    from gguf_fixtures import gpt2_vocab

    from millis.gen.gguf_tokenizer import GGUFBPETokenizer, _byte_level

    tokens, types, merges = gpt2_vocab(vocab_size, list(added))
    return GGUFBPETokenizer(_byte_level({"tokenizer.ggml.merges": merges}, tokens, types, "default", None), 2)


def allowed(m):
    import numpy as np

    return np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little").astype(bool)


def walk(toks, grammar: str, seed: int = 0, steps: int = 80):
    """Each llguidance tokenizer's masks along one random path the first one's grammar allows (the others following
    it): [[mask per tokenizer] per step]."""
    import random

    import numpy as np
    from llguidance import LLMatcher

    rng, ms, out = random.Random(seed), [LLMatcher(t, grammar, log_level=0) for t in toks], []
    for _ in range(steps):
        masks = [allowed(m) for m in ms]
        out.append(masks)
        ids = np.flatnonzero(masks[0])
        if not len(ids) or ms[0].is_stopped():
            break
        t = int(rng.choice(list(ids)))
        assert all(m.consume_token(t) for m in ms), [m.get_error() for m in ms]
    return out


def old_tokenizer(tok, n: int):
    """llguidance's own loading of an HF `tokenizers` tokenizer: what Grammars built before added tokens were text."""
    from llguidance import LLTokenizer

    return LLTokenizer(tok._tok.to_str(), n_vocab=n, eos_token=2)


def test_added_tokens_that_are_not_special_are_text():
    from millis.gen.grammar import Grammars

    n = CFG.vocab_size + 6  # embedding rows past the tokenizer's (Qwen2.5's 151,936 for 151,665 tokens)
    tok = byte_level(ADDED_TEXT)
    g, old = Grammars(tok, n, 2), old_tokenizer(tok, n)
    text = {CFG.vocab_size - 3 + k: t.encode() for k, (t, _) in enumerate(ADDED_TEXT)}
    assert all(tok.decode([i]) == t.decode() for i, t in text.items())
    assert all(old.is_special_token(i) for i in text)  # llguidance's loader: special (the bug)
    for i in range(n):
        if i in text:
            assert not g.tok.is_special_token(i) and g.tok.decode_bytes([i]) == text[i]
        else:  # every other token as llguidance loads it: the specials (<|endoftext|>, <|im_start|>) special
            assert (g.tok.is_special_token(i), g.tok.decode_bytes([i])) == (old.is_special_token(i),
                                                                           old.decode_bytes([i])), i
    assert g.tok.is_special_token(0) and g.tok.is_special_token(1) and g.tok.eos_token == old.eos_token == 2
    # the masks along a path: the same but for those tokens, which a JSON string may now hold
    grammar = json_schema_grammar(SCHEMA)
    others = [i for i in range(n) if i not in text]
    for seed in range(3):
        for new, was in walk([g.tok, old], grammar, seed):
            assert (new[others] == was[others]).all() and not was[list(text)].any()
    m = g.matcher(json_schema_grammar({"type": "string"}))
    assert m.consume_tokens(tok.encode('"a', special=False))
    mask = allowed(m)
    assert mask[list(text)].all() and not mask[[0, 1, 2]].any()  # text in a string; a special token is not
    assert m.consume_token(CFG.vocab_size - 3) and m.consume_tokens(tok.encode('"', special=False))
    assert m.is_accepting()
    # a grammar's text that the tokenizer writes with one added token: that token, which the grammar then takes
    m = g.matcher(lark_grammar('start: "<tool_call>\\n" "x"'))
    assert allowed(m).nonzero()[0].tolist() == [CFG.vocab_size - 3] and m.consume_token(CFG.vocab_size - 3)


def test_a_non_special_added_token_that_ends_generation_stays_special():
    """As text, a grammar would let it into a value, and the answer would end there."""
    from millis.gen.grammar import Grammars

    tok = byte_level([("<end_of_turn>", 4), ("<tool_call>", 4), ("<x>", 4)])
    g = Grammars(tok, CFG.vocab_size, 2, end_ids=(CFG.vocab_size - 1,))
    assert [g.tok.is_special_token(CFG.vocab_size - k) for k in (3, 2, 1)] == [True, False, True]


def test_tokenizers_without_such_tokens_load_as_before(smollm2):
    """SmolLM2 (its 17 added tokens all special) and the tiny vocabulary: Grammars' tokenizer is llguidance's own
    loading; the bytes Grammars rebuilds a tokenizer from where there are such tokens give the same tokenizer."""
    from llguidance import LLTokenizer, TokenizerWrapper

    from millis.gen.gguf import read_gguf
    from millis.gen.grammar import Grammars, _AddedAsText, added_text

    model = read_gguf(smollm2)
    grammar = json_schema_grammar(SCHEMA)
    for tok, n, eos in ((byte_level(), CFG.vocab_size + 6, 2), (model.tokenizer, model.config.vocab_size,
                                                               model.config.eos_id)):
        assert not added_text(tok._tok, n)
        old = LLTokenizer(tok._tok.to_str(), n_vocab=n, eos_token=eos)
        rebuilt = LLTokenizer(TokenizerWrapper(_AddedAsText(old, {}, n, eos)), n_vocab=n, eos_token=eos)
        new = Grammars(tok, n, eos).tok
        for t in (new, rebuilt):
            assert [t.decode_bytes([i]) for i in range(n)] == [old.decode_bytes([i]) for i in range(n)]
            assert [t.is_special_token(i) for i in range(n)] == [old.is_special_token(i) for i in range(n)]
        for seed in range(2):
            for masks in walk([old, new, rebuilt], grammar, seed):
                assert (masks[0] == masks[1]).all() and (masks[0] == masks[2]).all()


class _HF:
    """What Grammars reads of an HF `tokenizers` tokenizer (millis.gen.tokenizer's `_tok`)."""

    def __init__(self, tok) -> None:
        self._tok = tok


def metaspace(scheme: str):
    """A Llama-2 / Mistral-style tokenizer.json: SentencePiece BPE with byte fallback, spaces as `▁` (a Metaspace
    pre-tokenizer prepending one `always` or on the `first` piece, or the 2023 files' `legacy` Prepend("▁")
    normalizer), and added tokens that are not special: `<tool_call>`, `</tool_call>` (which llguidance's loader
    makes special) and `▁▁` (which it does not)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for c in "▁abcdefghijklmnopqrstuvwxyz{}\":,_<>/-0123456789":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "a"), ("▁", "{"), ("▁", "h"), ("▁h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if scheme == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>", "▁▁")])
    return tok


def spell(g, m, text: str) -> list[int]:
    """Write `text` through matcher `m`, each step the longest token the mask allows that spells its next bytes
    (where the grammar forces bytes llguidance allows their canonical tokens only); the tokens, and m accepting."""
    import numpy as np

    rest, out = text.encode(), []
    while rest:
        fits = [(len(b), int(t)) for t in np.flatnonzero(allowed(m)[:g.vocab_size])
                if (b := g.tok.decode_bytes([int(t)])) and rest.startswith(b)]
        assert fits, (text, rest, m.get_error())
        n, t = max(fits)
        assert m.consume_token(t), m.get_error()
        rest, out = rest[n:], out + [t]
    assert m.is_accepting() and allowed(m)[g.tok.eos_token]
    return out


@pytest.mark.parametrize("scheme", ["always", "first", "legacy"])
def test_metaspace_tokenizers_with_text_tokens_complete_grammars(scheme):
    """llguidance tokenizes a grammar's text as its loader does: without the Prepend("▁") normalizer, a Metaspace
    prefix never. With a non-special added token Grammars tokenized it with the tokenizer's own encode: every forced
    text began with a `▁` the grammar could not take (response_format failed on its first token, and a required call
    after its `<tool_call>`). Both grammars now complete, the call opened by the added token."""
    from millis.gen.grammar import Grammars
    from millis.serve.generation.tool_formats import HERMES
    from millis.serve.generation.tools import tool_spec

    tok = metaspace(scheme)
    n, mark = tok.get_vocab_size(True), tok.token_to_id("<tool_call>")
    g = Grammars(_HF(tok), n, tok.token_to_id("</s>"))
    assert not g.tok.is_special_token(mark) and g.tok.decode_bytes([mark]) == b"<tool_call>"
    assert g.tok.tokenize_str("<tool_call>\n{") == [mark, tok.token_to_id("<0x0A>"), tok.token_to_id("{")]
    spell(g, g.matcher(json_schema_grammar(SCHEMA)), '{"kind": "cat", "age": 7, "ok": true, "name": "ab", "tags": []}')
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]}}}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        m = g.matcher(HERMES.grammar(tool_spec({"tools": [tool], "tool_choice": choice})))
        ids = spell(g, m, '<tool_call>\n{"name": "get_time", "arguments": {"zone": -3}}\n</tool_call>')
        assert ids[0] == mark


def test_only_the_added_tokens_the_loader_made_special_are_rewritten():
    """llguidance's loader gives an added token that is not special the bytes its decoding writes unless it is
    spelled `<...>` (then special): those bytes stay (a byte-level `ü` reusing byte 0xFC's id is that byte, not
    `ü` in UTF-8; Metaspace's `▁▁` two spaces, not the `▁` characters' bytes), and the `<...>` ones are their
    decoded text."""
    from llguidance import LLTokenizer
    from tokenizers import AddedToken

    from millis.gen.grammar import Grammars

    tok = byte_level(ADDED_TEXT)
    inner = tok._tok
    inner.add_tokens([AddedToken("ü", special=False, normalized=False)])
    u = inner.token_to_id("ü")
    assert u < CFG.vocab_size - len(ADDED_TEXT)  # the byte's own id (byte-level: 0xFC)
    g, old = Grammars(tok, CFG.vocab_size, 2), old_tokenizer(tok, CFG.vocab_size)
    assert old.decode_bytes([u]) == b"\xfc" and not old.is_special_token(u)
    assert g.tok.decode_bytes([u]) == b"\xfc" and not g.tok.is_special_token(u)
    mark = CFG.vocab_size - 3
    assert g.tok.decode_bytes([mark]) == b"<tool_call>" and not g.tok.is_special_token(mark)
    for scheme in ("always", "legacy"):
        ms = metaspace(scheme)
        n, two = ms.get_vocab_size(True), ms.token_to_id("▁▁")
        g = Grammars(_HF(ms), n, 2)
        loaded = LLTokenizer(ms.to_str(), n_vocab=n, eos_token=2)
        assert g.tok.decode_bytes([two]) == b"  " == loaded.decode_bytes([two]) and not g.tok.is_special_token(two)
        assert ms.decode([ms.token_to_id("a"), two]) == "a  "
        for i in range(n):  # every other token as loaded
            if i not in (ms.token_to_id("<tool_call>"), ms.token_to_id("</tool_call>")):
                assert (g.tok.decode_bytes([i]), g.tok.is_special_token(i)) == (loaded.decode_bytes([i]),
                                                                               loaded.is_special_token(i)), i

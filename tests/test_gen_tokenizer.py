"""Llama2cTokenizer.encode (a heap of candidate merges, O(n log n)) gives exactly the ids of run.c's
quadratic loop, kept here as the reference: on the shared models' tokenizers over many random strings,
on synthetic vocabularies full of tied scores, and on hand-made tie-breaks. Long prompts stay cheap."""
import random

import pytest

from conftest import shared_model
from millis.gen.tokenizer import Llama2cTokenizer


def reference_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """The former merge loop, as llama2.c run.c: each round rescans every pair (quadratic)."""
    ids = [tok.BOS]
    if not text:
        return ids
    toks = tok.symbols(text)
    while True:  # merge the best-scoring adjacent pair (first one on ties, as run.c)
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(toks) - 1):
            j = tok.ids.get(tok.pieces[toks[i]] + tok.pieces[toks[i + 1]])
            if j is not None and tok.scores[j] > best:
                best, best_i, best_id = tok.scores[j], i, j
        if best_i < 0:
            return ids + toks
        toks[best_i:best_i + 2] = [best_id]


WORDS = ("once upon a time there was a little girl named Lily she loved to play outside in the park one day "
         "saw big red ball wanted it Tom said happy the and").split()
UNICODE = ("éñüßçøåœ€£¥©®™—–“”‘’"  # some in tok512, most not: byte fallback or <unk>
           "…•°±×÷"
           "αβγδπΩЖжшщ中文字日本語한국어😀🎉👍🏽\u200b\u00a0\u0301")


def random_texts(seed: int, n: int, max_len: int) -> list[str]:
    """Seeded texts of every kind: ASCII, story words, runs of one char, unicode (byte fallback or <unk>),
    whitespace, and the empty string."""
    rng = random.Random(seed)
    ascii_chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    out = ["", " ", "  ", "\n", "\t\n ", "a", "aa", "aaaa", "a" * 97, " " * 50, "e" * 64, "ab" * 40, UNICODE]
    while len(out) < n:
        k = rng.randint(1, max_len)
        kind = rng.randrange(6)
        if kind == 0:
            t = "".join(rng.choice(ascii_chars) for _ in range(k))
        elif kind == 1:
            t = " ".join(rng.choice(WORDS) for _ in range(k // 5 + 1))[:k]
        elif kind == 2:
            t = "".join(rng.choice("ae t") * rng.randint(1, 12) for _ in range(k // 6 + 1))[:k]
        elif kind == 3:
            t = "".join(rng.choice(UNICODE) for _ in range(k // 2 + 1))
        elif kind == 4:
            t = "".join(rng.choice(" \n\t\r\u3000") for _ in range(k // 3 + 1))
        else:
            t = "".join(rng.choice((rng.choice(WORDS) + " ", rng.choice(UNICODE), rng.choice(ascii_chars)))
                        for _ in range(k // 3 + 1))
        out.append(t)
    return out


def stories_tok() -> Llama2cTokenizer:
    return Llama2cTokenizer.from_bin(shared_model("stories260K") / "tok512.bin", 512)


def baby_tok() -> Llama2cTokenizer:
    return Llama2cTokenizer.from_vocab(shared_model("babyllama-tok105") / "tok105.vocab")


@pytest.mark.parametrize("load", [stories_tok, baby_tok], ids=["stories260K-bin", "babyllama-vocab"])
def test_matches_reference_on_shared_tokenizers(load):
    tok = load()
    for text in random_texts(seed=1, n=400, max_len=400):
        assert tok.encode(text) == reference_encode(tok, text), repr(text)


def synthetic_tok(rng: random.Random, alphabet: str, n_merged: int, score_levels: int) -> Llama2cTokenizer:
    """Characters, then merged pieces made of two earlier pieces; scores from a few levels, so many tie."""
    pieces = ["<unk>", "<s>", "</s>"] + list(alphabet)
    while len(pieces) < 3 + len(alphabet) + n_merged:
        p = rng.choice(pieces[3:]) + rng.choice(pieces[3:])
        if p not in pieces and len(p) <= 6:
            pieces.append(p)
    scores = [0.0] * 3 + [float(-rng.randrange(score_levels)) for _ in pieces[3:]]
    return Llama2cTokenizer(pieces, scores)


def test_matches_reference_on_tied_scores():
    rng = random.Random(7)
    for v in range(40):
        alphabet = "ab" if v % 3 == 0 else "abc" if v % 3 == 1 else " abc"  # " ": the dummy prefix too
        tok = synthetic_tok(rng, alphabet, n_merged=rng.randint(2, 25), score_levels=rng.choice((1, 2, 3)))
        for _ in range(25):
            text = "".join(rng.choice(alphabet + "ab" + "x") for _ in range(rng.randint(0, 40)))  # x: <unk>
            assert tok.encode(text) == reference_encode(tok, text), (tok.pieces, tok.scores, text)


def hand_tok(merged: dict[str, float]) -> Llama2cTokenizer:
    pieces = ["<unk>", "<s>", "</s>", "a", "b", "c", "d"] + list(merged)
    return Llama2cTokenizer(pieces, [0.0] * 7 + list(merged.values()))


@pytest.mark.parametrize("merged, text, expected", [
    # "ab" first; then the new pair "abc" (left) ties with the older "cd" (right): leftmost wins
    ({"ab": 5.0, "abc": 1.0, "cd": 1.0}, "abcd", ["abc", "d"]),
    # "cd" first; then the older pair "ab" (left) ties with the new "bcd" (right): leftmost wins
    ({"cd": 5.0, "ab": 1.0, "bcd": 1.0}, "abcd", ["ab", "cd"]),
    # after "bc", both new pairs tie: the left one
    ({"bc": 5.0, "abc": 1.0, "bcd": 1.0}, "abcd", ["abc", "d"]),
    # all tied: left to right, greedily
    ({"ab": 0.0, "bc": 0.0, "cd": 0.0, "abc": 0.0}, "abcd", ["abc", "d"]),
    ({"aa": 0.0, "aaa": 0.0, "aaaa": 0.0}, "aaaaa", ["aaaa", "a"]),
    # a higher score to the right beats the leftmost pair
    ({"ab": 1.0, "bc": 2.0}, "abc", ["a", "bc"]),
    # run.c's floor: a pair scoring -1e10 or less never merges
    ({"ab": -1e10, "bc": -9.9e9}, "abc", ["a", "bc"]),
    ({"ab": -1e10}, "ab", ["a", "b"]),
])
def test_ties_go_to_the_leftmost_pair_as_run_c(merged, text, expected):
    tok = hand_tok(merged)
    want = [tok.BOS] + [tok.ids[p] for p in expected]
    assert reference_encode(tok, text) == want
    assert tok.encode(text) == want


def test_symbols_before_merging():
    """The dummy-prefix space, then one id per character: UTF-8 bytes (<0x00> is id 3) where the vocabulary
    has byte fallback and not the character, <unk> where it has neither."""
    plain = Llama2cTokenizer(["<unk>", "<s>", "</s>", " ", "a", "b"], [0.0] * 6)
    assert plain.symbols("ab é") == [3, 4, 5, 3, plain.UNK]
    assert plain.symbols("") == [3]
    no_space = Llama2cTokenizer(["<unk>", "<s>", "</s>", "a"], [0.0] * 4)
    assert no_space.symbols("aa") == [3, 3]
    fallback = Llama2cTokenizer(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["a"], [0.0] * 260)
    assert fallback.byte_fallback and fallback.symbols("aé") == [259, 0xC3 + 3, 0xA9 + 3]


def test_long_prompt_work_grows_near_linearly(monkeypatch):
    """The quadratic loop took 10 s for 8k characters and 100x longer for 10x the text; now 10x the text
    costs about 10x the merge heap's work (counted, not timed: a busy machine does not move it)."""
    tok = stories_tok()
    rng = random.Random(3)
    text = " ".join(rng.choice(WORDS + ["aaaa", "ééé", "😀"]) for _ in range(50_000))[:200_000]

    import heapq

    import millis.gen.tokenizer as tokmod

    ops = [0]

    class Counted:  # the tokenizer's heapq, each push and pop counted
        def __getattr__(self, name):
            fn = getattr(heapq, name)

            def counted(*a, **k):
                ops[0] += 1
                return fn(*a, **k)
            return counted
    monkeypatch.setattr(tokmod, "heapq", Counted())

    def work(t: str) -> int:
        ops[0] = 0
        tok.encode(t)
        return ops[0]

    small, large = work(text[:20_000]), work(text)
    assert small > 1000 and large < 15 * small, (small, large)  # 10x the text


TEMPLATES = [
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # namespace, loop controls, tojson (no HTML escaping), the generation tag, dict(), reasoning aliases, strftime
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ bos_token }}{{ m | tojson }}|{{ dict(a=1) | tojson(indent=2) }}"
    "{% generation %}<{{ m.content }}>{% endgeneration %}{{ m.reasoning_content or '' }}{% endfor %}"
    "{{ ns.n }}{{ strftime_now('%Y') }}{% if add_generation_prompt %}\n  <assistant>{% endif %}",
]
CONVERSATION = [{"role": "system", "content": "be <brief> & kind"},
                {"role": "user", "content": "caf\u00e9 \"quoted\""},
                {"role": "assistant", "content": "ok", "thinking": "hmm"},
                {"role": "user", "content": "again"}]


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_rendering_matches_transformers(template):
    """millis renders chat templates without importing transformers; the text must be transformers' own."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from millis.gen.chat_template import render_chat

    special = {"bos_token": "<s>", "eos_token": "</s>"}
    want = render_jinja_template([CONVERSATION], chat_template=template, add_generation_prompt=True, **special)[0][0]
    assert render_chat(template, CONVERSATION, special) == want


def test_chat_templates_stay_sandboxed():
    import jinja2

    from millis.gen.chat_template import render_chat

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{% set ns = namespace(_x=1) %}", CONVERSATION, {})
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.append(1) }}", CONVERSATION, {})  # immutable: the conversation cannot change
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        render_chat("{{ raise_exception('no tools') }}", CONVERSATION, {})
    assert render_chat("{{ ''.__class__ }}", CONVERSATION, {}) == ""  # unsafe attributes are undefined


@pytest.mark.parametrize("name", ["qwen2_5_tools.jinja", "llama3_tools.jinja"])
def test_tool_templates_render_as_transformers(name):
    """Templates that show tools (Qwen2.5's `<tool_call>`, Llama 3's JSON) get the tools and earlier calls
    as transformers passes them, and render to transformers' own text."""
    from pathlib import Path

    from transformers.utils.chat_template_utils import render_jinja_template

    from millis.gen.chat_template import render_chat

    template = (Path(__file__).parent / "data" / name).read_text()
    tools = [{"type": "function", "function": {"name": "get_time", "description": "the time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]}}}]
    chat = [{"role": "user", "content": "time in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": 1}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    want = render_jinja_template([chat], tools=tools, chat_template=template, add_generation_prompt=True,
                                 **special)[0][0]
    got = render_chat(template, chat, special, tools)
    assert got == want and "get_time" in got and '{"zone": 1}' in got

"""A whole answer's logprobs object, built a slice at a time (millis.serve.generation.logprobs): equal to the
object built at once, for chat and completions, with and without alternatives; and the event loop runs
other work between the slices (built at once, 2,048 tokens of 20 alternatives held it ~0.4 s)."""
from __future__ import annotations

import asyncio
import random

import pytest

from millis.serve.generation.logprobs import LOGPROBS_SLICE, TextOffset, answer_logprobs, joined_logprobs, logprobs_body


class Tok:
    """Pieces of different lengths, some multi-byte."""

    def decode(self, ids):
        (i,) = ids
        return ["a", "bc", " déf", "😀", ""][i % 5] + str(i % 3)


def entries(n: int, top: int, seed: int = 0):
    rng = random.Random(seed)
    return [(rng.randrange(50), -rng.random(), [(rng.randrange(50), -rng.random()) for _ in range(top)])
            for _ in range(n)]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("n,top", [(1, 0), (LOGPROBS_SLICE, 3), (3 * LOGPROBS_SLICE + 5, 0), (100, 20)])
def test_sliced_answer_equals_the_whole(chat, n, top):
    es = entries(n, top)
    for tok in (Tok(), None):
        whole = logprobs_body(chat, es, tok)
        steps = [(es[k:k + 3], "") for k in range(0, len(es), 3)]  # engine steps of 3 tokens (speculation)
        assert asyncio.run(answer_logprobs(chat, steps, tok)) == whole
        if not chat:
            assert whole["text_offset"] == [sum(len(t) for t in whole["tokens"][:k]) for k in range(n)]
            # each position's alternatives hold the chosen token too (OpenAI's and vLLM's completions)
            assert all(t in d and len(d) <= top + 1 for t, d in zip(whole["tokens"], whole["top_logprobs"]))
        else:
            assert whole["content"][-1]["bytes"] == list(whole["content"][-1]["token"].encode())
    assert asyncio.run(answer_logprobs(chat, [], Tok())) is None and joined_logprobs(chat, [None]) is None


def test_the_loop_serves_others_between_slices():
    es = entries(2048, 20)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)
        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        body = await answer_logprobs(True, [([e], "x") for e in es], Tok())
        t.cancel()
        return ticks - before, body
    turns, body = asyncio.run(main())
    assert len(body["content"]) == 2048 and len(body["content"][0]["top_logprobs"]) == 20
    assert turns >= 2048 // LOGPROBS_SLICE - 1


def test_minus_infinity_is_a_number_in_json():
    """A grammar masks tokens to -inf before the logprobs are taken: an alternative at -inf was written as
    `null` (orjson), where OpenAI's logprob is a number; it is -9999.0, as vLLM writes it."""
    import orjson

    es = [(1, 0.0, [(1, 0.0), (2, float("-inf"))])]
    chat = logprobs_body(True, es, Tok())
    assert chat["content"][0]["top_logprobs"][1]["logprob"] == -9999.0
    at = TextOffset()
    at.chars = 7
    comp = logprobs_body(False, es, Tok(), at=at)
    assert list(comp["top_logprobs"][0].values()) == [0.0, -9999.0] and comp["text_offset"] == [7]
    assert b"null" not in orjson.dumps(chat) + orjson.dumps(comp)


class ByteTok:
    """A byte-fallback vocabulary: ids 0..255 are single bytes, 256 is "ab", 257 " c"."""

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else {256: b"ab", 257: b" c"}[i]

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def test_bytes_and_offsets_of_characters_several_tokens_spell():
    """A character spelt by several byte tokens: each token's `bytes` is its byte (joined, the text), not U+FFFD's
    three; and every token of it starts where the character starts (offsets counted in the answer's characters,
    sliced or whole, streamed chunk by chunk or at once)."""
    text = "ab😀é c😀"
    ids = [256, *text[2].encode(), *text[3].encode(), 257, *text[6].encode()]
    es = [(i, -0.5, []) for i in ids]
    chat = logprobs_body(True, es, ByteTok())
    assert b"".join(bytes(c["bytes"]) for c in chat["content"]).decode() == text
    comp = logprobs_body(False, es, ByteTok())
    assert comp["text_offset"] == [0, 2, 2, 2, 2, 3, 3, 4, 6, 6, 6, 6]
    assert all(text[o:].startswith(text[o]) for o in comp["text_offset"])  # every offset inside the text
    at = TextOffset()
    streamed = [o for k in range(len(es)) for o in logprobs_body(False, es[k:k + 1], ByteTok(), at=at)["text_offset"]]
    assert streamed == comp["text_offset"] and at.chars == len(text)


@pytest.mark.parametrize("which", ["stories260K", "smollm2"])
def test_token_bytes_spell_the_text_on_real_tokenizers(which, request):
    """llama2.c's <0xXX> byte pieces and SmolLM2's byte-level BPE: the tokens' bytes, joined, are the text's UTF-8
    (decoding each token alone gives U+FFFD for a character's bytes)."""
    from conftest import shared_model
    from millis.gen import EngineConfig, open_engine
    from millis.gen.tokenizer import token_bytes

    model = (str(shared_model("stories260K") / "stories260K.bin") if which == "stories260K"
             else request.getfixturevalue("smollm2"))
    tok = open_engine(model, EngineConfig(max_batch=1, max_seq=64)).tok
    text = "héllo 😀 wörld"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some token is a piece of a character
    assert b"".join(token_bytes(tok, i) for i in ids).decode().strip() == text


def test_offsets_after_a_first_token_whose_space_the_text_drops():
    """After BOS a SentencePiece decoder drops the first token's leading space from the answer's text: the offsets
    after it count one less, so each still points at its token's place in the text."""
    tok = ByteTok()
    es = [(257, -0.1, []), (256, -0.1, []), (257, -0.1, [])]  # " c", "ab", " c": the answer's text "cab c"
    steps = [([e], t) for e, t in zip(es, ["c", "ab", " c"])]
    got = asyncio.run(answer_logprobs(False, steps, tok))
    assert got["text_offset"] == [0, 1, 3]
    text = "cab c"
    assert text[1:].startswith("ab") and text[3:] == " c"  # without the step's correction: 0, 2, 4 (past "ab")


def test_token_bytes_of_a_metaspace_tokenizer(tmp_path):
    """A Llama 2 style tokenizer.json (Metaspace, byte fallback, a Strip decoder): the lone ▁ token is a space (its
    decoding alone is empty, which was read as a special token: no bytes), byte pieces their byte, specials none."""
    from millis.gen.tokenizer import token_bytes

    tok = metaspace_tokenizer(tmp_path)
    assert tok.decode([2]) == ""  # alone, the space is stripped
    assert [token_bytes(tok, i) for i in (3, 2, 4, 5, 1)] == [b" hello", b" ", b"\xc3", b"\xa9", b""]


def metaspace_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from millis.gen.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "\u2581": 2, "\u2581hello": 3, "<0xC3>": 4, "<0xA9>": 5, "\u2581the": 6, "the": 7}
    t = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.add_special_tokens(["<s>"])
    t.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(tmp_path / "tokenizer.json", eos_id=None)


def test_token_names_keep_spaces_and_tell_tokens_apart(tmp_path):
    """Decoding a SentencePiece token alone drops its leading space ("▁the" was "the", and "".join of an answer's
    tokens lost every space); byte pieces all read U+FFFD and special tokens "", so completions' top_logprobs map
    kept one of them, with the lowest log p (the last written). Names are now the bytes' text, "bytes:\\xc3" for
    a piece of a character, a special token's vocabulary entry."""
    tok = metaspace_tokenizer(tmp_path)
    es = [(6, -0.1, [(6, -0.1), (7, -0.2)]), (3, -0.3, [(3, -0.3), (2, -0.4)]),
          (4, -0.5, [(4, -0.5), (5, -1.0), (1, -1.5)])]
    comp = logprobs_body(False, es, tok)
    assert comp["tokens"] == [" the", " hello", "bytes:\\xc3"] and "".join(comp["tokens"][:2]) == " the hello"
    assert comp["top_logprobs"][0] == {" the": -0.1, "the": -0.2}
    assert comp["top_logprobs"][1] == {" hello": -0.3, " ": -0.4}
    assert comp["top_logprobs"][2] == {"bytes:\\xc3": -0.5, "bytes:\\xa9": -1.0, "<s>": -1.5}
    chat = logprobs_body(True, es, tok)
    assert [c["token"] for c in chat["content"]] == comp["tokens"] and chat["content"][2]["bytes"] == [0xC3]
    assert [a["token"] for a in chat["content"][2]["top_logprobs"]] == ["bytes:\\xc3", "bytes:\\xa9", "<s>"]


def test_completions_alternatives_hold_the_chosen_token_and_the_likelier_of_a_shared_name():
    """A sampled token outside the top k is in its position's map (OpenAI's legacy completions give up to
    logprobs + 1 entries); `logprobs: 0` gives the chosen one alone (it was null); two ids of one name keep the
    likelier's log p."""
    class Same:
        def decode(self, ids):
            return "x"
    comp = logprobs_body(False, [(9, -3.0, [(1, -0.1)]), (4, -0.7, ())], Tok())
    assert comp["top_logprobs"] == [{"bc1": -0.1, "0": -3.0}, {"1": -0.7}]
    assert logprobs_body(False, [(1, -0.2, [(1, -0.2), (2, -0.9)])], Same())["top_logprobs"] == [{"x": -0.2}]


def test_ranked_breaks_ties_as_greedy_does():
    """topk put the highest id of a tie first, greedy (argmax) takes the lowest: the chosen token was not the
    first of its own top_logprobs. Ranked: best first, a tie in id order, k past the vocabulary all of it."""
    import torch

    from millis.gen.sampling import argmax_rows, ranked

    lp = torch.full((1000,), -20.0)
    lp[[3, 500, 900]] = -1.0
    lp[7] = -2.0
    assert ranked(lp, 1) == ((3, -1.0),) and int(argmax_rows(lp[None])[0]) == 3
    assert [i for i, _ in ranked(lp, 4)] == [3, 500, 900, 7]
    assert len(ranked(lp[:8], 20)) == 8 and ranked(lp, 0) == ()


def test_a_grammar_rows_logprobs_are_the_models_own(tmp_path):
    """A grammar masks the logits before sampling; logprobs were taken after the mask: a forced token read log p 0
    and its alternatives -inf. They are the model's own distribution, as docs/generation.md says."""
    import torch

    from gguf_fixtures import random_llama_tensors, write_tiny_gguf
    from millis.gen import EngineConfig, SamplingParams, open_engine
    from millis.gen.config import LlamaConfig
    from millis.gen.grammar import json_schema_grammar

    cfg = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=128, hidden_dim=128,
                      norm_eps=1e-5, rope_theta=10000.0)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, cfg, random_llama_tensors(cfg, "F32"), tokenizer="llama")
    eng = open_engine(str(path), EngineConfig(max_batch=2, max_seq=128, threads=1))
    prompt = [1, 40, 41, 42, 43]
    eng.add(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=3, grammar=json_schema_grammar(None)))
    outs = []
    while eng.has_work:
        outs += eng.step()
    toks, ents = [t for o in outs for t in o.token_ids], [e for o in outs for e in o.logprobs]
    ref = torch.log_softmax(eng.logits(prompt + toks).float(), -1)
    assert len(ents) == len(toks) >= 2
    for k, (t, v, top) in enumerate(ents):
        row = ref[len(prompt) - 1 + k]
        assert abs(v - float(row[t])) < 1e-4, (k, v, float(row[t]))
        assert [i for i, _ in top] == [i for i, _ in ranked_ref(row, 3)], (k, top)


def ranked_ref(row, k):
    order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
    return [(i, float(row[i])) for i in order[:k]]

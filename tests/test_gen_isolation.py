"""One request never fails another inside the engine: whatever a request raises in its prefill, its
decode row, its sampling or its text ends that request alone (finished "error"), and its batch-mates
give exactly the tokens they give alone. Also the bounds of SamplingParams and the stop-string hold-back."""
import pytest
import torch

from millis.common.errors import MillisError
from millis.gen import SamplingParams
from millis.gen.engine import held_back
from test_gen_engine import GREEDY, engine, run

PROMPTS = ["the cat", "an ant in", "hello the", "a bat"]


def alone(prompt: str, params: SamplingParams) -> dict:
    return run(engine(), [prompt], params)[0]


def poisoned(**fields) -> SamplingParams:
    """Params a caller got past validation (as the server's old top_k=2**63 did: torch.tensor raised)."""
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=1)
    for k, v in fields.items():
        object.__setattr__(p, k, v)
    return p


def run_with_poison(eng, poison_prompt: str, poison: SamplingParams):
    """PROMPTS[:3] greedy, plus one poison request added after them (it joins their batch)."""
    return run(eng, PROMPTS[:3] + [poison_prompt], [GREEDY] * 3 + [poison])


def check_batch_mates(results):
    for prompt, got in zip(PROMPTS[:3], results[:3]):
        ref = alone(prompt, GREEDY)
        assert got["ids"] == ref["ids"] and got["text"] == ref["text"] and got["finished"] == "length", prompt


def test_a_request_whose_sampling_raises_fails_alone():
    eng = engine()
    results = run_with_poison(eng, PROMPTS[3], poisoned(top_k="k"))  # sample() raises TypeError
    check_batch_mates(results)
    bad = results[3]
    assert bad["finished"] == "error" and bad["ids"] == []
    assert eng.free_slots == eng.max_batch and not eng.requests  # its slot is free again
    assert run(eng, ["the cat"], GREEDY)[0]["ids"] == alone("the cat", GREEDY)["ids"]  # the engine goes on


def test_seeded_batch_mates_draw_the_same_tokens_when_a_row_is_retried():
    seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    ref = alone(PROMPTS[0], seeded)
    eng = engine()
    got = run(eng, [PROMPTS[0], PROMPTS[1]], [seeded, poisoned(top_k="k")])
    assert got[0]["ids"] == ref["ids"] and got[1]["finished"] == "error"


def test_error_reason_is_reported_in_the_step_output():
    eng = engine()
    rid = eng.add(PROMPTS[0], poisoned(top_k="k"))
    outs = eng.step()
    assert [(o.id, o.finished) for o in outs] == [(rid, "error")]
    assert outs[0].error.startswith("TypeError")


class RaisingModel(torch.nn.Module):
    """Wraps the model: raises when `trigger` is among the token ids of the call."""

    def __init__(self, model, trigger: int):
        super().__init__()
        self.inner, self.trigger = model, trigger

    def forward(self, batch):
        if (batch.ids == self.trigger).any():
            raise RuntimeError("poison token")
        return self.inner(batch)


@pytest.mark.parametrize("runtime", ["native", "torch"])  # torch: new prompts prefill in one padded forward
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_request_whose_forward_raises_fails_alone(where, runtime):
    eng = engine(runtime=runtime)
    z = eng.tok.ids["z"]
    eng.model = RaisingModel(eng.model, z)
    # prefill: 'z' in the prompt; decode: once prefilled, the poison row's next input is forced to 'z'
    prompt = "zz" if where == "prefill" else "a bat"
    rids = [eng.add(p, GREEDY) for p in PROMPTS[:3]] + [eng.add(prompt, GREEDY)]
    got = {r: {"ids": [], "finished": None} for r in rids}
    forced = where == "prefill"
    while eng.has_work:
        for o in eng.step():
            got[o.id]["ids"] += o.token_ids
            got[o.id]["finished"] = o.finished
        poison = eng.requests.get(rids[3])
        if not forced and poison is not None and poison.out:
            poison.out[-1], forced = z, True
    assert forced
    for p, r in zip(PROMPTS[:3], rids):
        assert got[r]["ids"] == alone(p, GREEDY)["ids"] and got[r]["finished"] == "length", p
    assert got[rids[3]]["finished"] == "error"
    assert eng.free_slots == eng.max_batch and not eng.requests


def test_a_request_whose_text_raises_fails_alone(monkeypatch):
    import millis.gen.engine as engine_module

    eng = engine()
    real = engine_module.new_text

    def text(tok, eos, r, final):
        if r.prompt == eng.tok.encode("a bat"):
            raise UnicodeError("bad bytes")
        return real(tok, eos, r, final)

    monkeypatch.setattr(engine_module, "new_text", text)
    results = run_with_poison(eng, "a bat", GREEDY)
    check_batch_mates(results)
    assert results[3]["finished"] == "error"


def test_sampling_params_are_bounded():
    # each refused by the check of its own field (temperature, top_k, top_p and repetition_penalty share one message
    # that names all four: the match pins that check, not which of them failed)
    shared = "temperature <= 100, top_k >= 0, 0 < top_p <= 1 and"
    for bad, named in [(dict(temperature=1e9), "temperature <="), (dict(top_p=0), "0 < top_p <= 1"),
                       (dict(repetition_penalty=1e-300), f"{shared} .* <= repetition_penalty <="),
                       (dict(repetition_penalty=1e9), f"{shared} .* <= repetition_penalty <="),
                       (dict(top_k=-1), "top_k >= 0"),
                       (dict(seed=1 << 64), f"seed must fit 64 bits, got {1 << 64}"),
                       (dict(seed=-(1 << 63) - 1), f"seed must fit 64 bits, got {-(1 << 63) - 1}"),
                       (dict(presence_penalty=2.01), "presence_penalty and frequency_penalty .*got 2.01 and 0.0"),
                       (dict(frequency_penalty=-1e300), r"presence_penalty and frequency_penalty .*got 0.0 and -1e\+300"),
                       (dict(presence_penalty=float("nan")), "presence_penalty and frequency_penalty .*got nan and 0.0"),
                       (dict(logit_bias=((5, 100.5),)), "logit_bias"), (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
                       (dict(logit_bias=((5, 1.0), (5, 2.0))), "logit_bias"),
                       (dict(logit_bias=((5, float("nan")),)), "logit_bias"),
                       (dict(logit_bias=tuple((i, 1.0) for i in range(301))), "logit_bias")]:
        with pytest.raises(MillisError, match=named):
            SamplingParams(**bad)
    SamplingParams(seed=(1 << 64) - 1, temperature=100, repetition_penalty=0.01, presence_penalty=-2,
                   frequency_penalty=2, logit_bias=tuple((i, (-1) ** i * 100.0) for i in range(300)))
    eng = engine()
    with pytest.raises(MillisError, match="logit_bias"):  # the vocabulary is the engine's to check
        eng.add(PROMPTS[0], SamplingParams(logit_bias=((eng.config.vocab_size, 1.0),)))


def test_tiny_temperature_is_greedy_and_huge_top_k_keeps_all():
    eng = engine()
    got = run(eng, PROMPTS[:2], [SamplingParams(max_tokens=10, temperature=1e-9, ignore_eos=True),
                                 SamplingParams(max_tokens=10, temperature=1e-9, top_k=10 ** 9, ignore_eos=True)])
    ref = [alone(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in PROMPTS[:2]]
    assert [g["ids"] for g in got] == [r["ids"] for r in ref]


def test_held_back_is_the_longest_pending_start_of_a_stop():
    assert held_back("hello wor", "world") == 3
    assert held_back("hello w", "world") == 1
    assert held_back("hello", "world") == 0
    assert held_back("aaa", "aaab") == 3
    assert held_back("xabab", "ababc") == 4
    assert held_back("", "ab") == 0
    assert held_back("abc", "c") == 0  # a one-character stop is never pending: it is found or not


def test_held_back_equals_the_quadratic_definition():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        ref = max((n for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        assert held_back(text, stop) == ref, (text, stop)


def test_text_held_back_every_step_still_moves_the_anchor():
    """A request whose text always ends in a stop string's start (a run of "a" against the stop "a" * 20 + "b")
    holds text back at every step; its decode anchor still moves (short of the held-back text), so a step decodes
    a bounded tail, not the whole output (it stayed at 0: O(output) work a step, under the engine's lock). The
    text handed out is the same either way."""
    from types import SimpleNamespace

    from millis.gen.stops import new_text
    from test_gen_engine import char_tokenizer

    tok = char_tokenizer()
    a = tok.encode("a")[-1]
    stop = "a" * 20 + "b"
    r = SimpleNamespace(out=[], prompt=tok.encode("the"), params=SamplingParams(stop=(stop,), ignore_eos=True),
                        anchor=0, anchor_text="", emitted="")
    got = ""
    for step in range(300):
        r.out.append(a)
        new, stopped = new_text(tok, frozenset({2}), r, final=False)
        assert not stopped
        got += new
        assert got == "a" * max(0, len(r.out) - 20)  # all but the 20 that may yet start the stop string
    assert r.anchor >= 300 - len(stop) - 8 - 16, r.anchor  # a bounded tail decoded each step
    assert r.anchor_text == "a" * r.anchor


def test_a_stop_string_does_not_match_a_character_still_incomplete(monkeypatch):
    """Token 204 is the first byte of "ɾ": decoded alone it ends in U+FFFD, a placeholder for the bytes to come.
    A stop string holding "\ufffd" must not end the request there (it stopped after 4 tokens, "stop", with no
    U+FFFD in its text); a U+FFFD that stays (the last text, or text after it) still matches."""
    from types import SimpleNamespace

    import millis.gen.stops as stops

    pieces = {79: b"L", 125: b"z", 204: b"\xc9", 193: b"\xbe", 30: b"x", 7: b"\xff"}
    monkeypatch.setattr(stops, "text_delta", lambda tok, context, ids: b"".join(pieces[i] for i in ids).decode(
        "utf-8", errors="replace"))

    def request(out):
        return SimpleNamespace(out=out, prompt=[1], anchor=0, anchor_text="", emitted="",
                               params=SimpleNamespace(stop=("\ufffd",), ignore_eos=False))

    r = request([79, 79, 125, 204])
    assert stops.new_text(object(), frozenset({2}), r, final=False) == ("LLz", False)
    r.out += [193, 30]
    assert stops.new_text(object(), frozenset({2}), r, final=False) == ("\u027ex", False)
    r = request([79, 7])  # an invalid byte: U+FFFD for good once text follows it, or at the end
    assert stops.new_text(object(), frozenset({2}), r, final=False) == ("L", False)
    r.out += [30]
    assert stops.new_text(object(), frozenset({2}), r, final=False) == ("", True)
    assert stops.new_text(object(), frozenset({2}), request([79, 7]), final=True) == ("L", True)

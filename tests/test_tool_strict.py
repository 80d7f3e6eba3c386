"""OpenAI's per-function `strict` under tool_choice auto: a native format (hermes, llama3) leaves text free but
constrains every call the model starts to a valid call of the request's tools (llguidance grammars, driven here
token by token), the route returns only valid calls, streams such an answer's content as an unconstrained auto
one, and refuses a non-boolean `strict`; without it nothing changes."""
from __future__ import annotations

import dataclasses
import json

import jsonschema
import numpy as np
import pytest
import torch
from gguf_fixtures import random_llama_tensors, write_tiny_gguf
from test_serve import Server
from test_serve_gen import stream
from test_serve_structured import CFG, DATA, MSGS, TIME, WEATHER, joined_calls

from millis.gen.grammar import allow_only
from millis.serve.generation.tool_formats import GENERIC, HERMES, LLAMA3
from millis.serve.generation.tools import tool_spec
from millis.serve.schemas import ApiError

# `<tool_call>` as one ordinary token of the vocabulary (its bytes are its text), as llguidance should see Qwen2.5's
# (an added token that is not special): a model can write it in one step, which a logit_bias can push
ADDED = [("<tool_call>", 1), ("</tool_call>", 1)]
# Qwen2.5's own: added tokens that are not special (tokenizer.json "special": false; GGUF user-defined), which
# llguidance's loader makes special and Grammars makes text again
USER_DEFINED = [("<tool_call>", 4), ("</tool_call>", 4)]
BOTH = pytest.mark.parametrize("grammars", [ADDED, USER_DEFINED], indirect=True, ids=["normal", "user-defined"])
MARK_ID = CFG.vocab_size - 2  # the vocabulary's last ids are the added tokens
EOS = 2


def strict(tool: dict, value=True) -> dict:
    return {"type": "function", "function": {**tool["function"], "strict": value}}


TOOLS = [strict(WEATHER), TIME]  # one strict tool: every call is constrained
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": -3}}\n</tool_call>'


@pytest.fixture(scope="module")
def grammars(tmp_path_factory, request):
    """The engine's Grammars and tokenizer of a tiny GGUF whose vocabulary holds `<tool_call>` as one token (an added
    one, as the servers' vocabulary, unless a test asks for ADDED: BOTH)."""
    from millis.gen import EngineConfig, open_engine

    path = tmp_path_factory.mktemp("strict") / "m.gguf"
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "F32"), added=getattr(request, "param", USER_DEFINED))
    eng = open_engine(str(path), EngineConfig(max_batch=1, max_seq=64, threads=1))
    assert eng.tok.decode([MARK_ID]) == "<tool_call>" and not eng.grammars.tok.is_special_token(MARK_ID)
    return eng.grammars, eng.tok


def allowed(m) -> np.ndarray:
    return np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little").astype(bool)


def follow(g, m, text: str, longest: bool) -> bool:
    """Write `text` through matcher `m`, each step with a token the mask allows that spells the text's next bytes (the
    longest such, `<tool_call>` one token where free, or the shortest: spelled out); where the grammar forces bytes,
    llguidance allows only their canonical tokens. False when no allowed token goes on with the text."""
    rest = text.encode()
    while rest:
        fits = [(len(b), t) for t in np.flatnonzero(allowed(m)) if (b := g.tok.decode_bytes([int(t)])) and
                rest.startswith(b)]
        if not fits:
            return False
        n, t = max(fits) if longest else min(fits)
        assert m.consume_token(int(t)), m.get_error()
        rest = rest[n:]
    return True


def run(grammars, grammar: str, text: str) -> tuple[bool, bool]:
    """(the mask lets `text` be written, EOS allowed after it): the same written with the longest tokens and spelled
    out."""
    g, _ = grammars
    out = []
    for longest in (True, False):
        m = g.matcher(grammar)
        ok = follow(g, m, text, longest)
        out.append((ok, ok and bool(allowed(m)[EOS])))
        assert not ok or out[-1][1] == m.is_accepting()
    assert out[0] == out[1], (text, out)
    return out[0]


def test_strict_is_read_and_refused_when_not_a_boolean():
    assert tool_spec({"tools": TOOLS}).strict and not tool_spec({"tools": [WEATHER, TIME]}).strict
    assert not tool_spec({"tools": [strict(WEATHER, False), strict(TIME, None)]}).strict  # null: absent
    for bad in ("true", 1, {}):
        with pytest.raises(ApiError) as e:
            tool_spec({"tools": [WEATHER, strict(TIME, bad)]})
        assert e.value.status == 422 and e.value.param == "tools" and "tools[1].function.strict" in str(e.value)
    spec = tool_spec({"tools": TOOLS})
    assert all("strict" not in t for t in spec.tools)  # not shown to the template (tojson of a tool would)


def test_strict_absent_no_grammar_and_required_unchanged():
    plain = tool_spec({"tools": [WEATHER, TIME]})
    assert HERMES.grammar(plain) is None and LLAMA3.grammar(plain) is None  # auto: free, as before
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        a, b = tool_spec({"tools": [WEATHER, TIME], "tool_choice": choice}), tool_spec({"tools": TOOLS,
                                                                                        "tool_choice": choice})
        assert HERMES.grammar(a) == HERMES.grammar(b) and LLAMA3.grammar(a) == LLAMA3.grammar(b)
    assert GENERIC.grammar(plain) == GENERIC.grammar(tool_spec({"tools": TOOLS}))  # always constrained
    spec = tool_spec({"tools": TOOLS})
    assert HERMES.grammar(spec) and LLAMA3.grammar(spec)
    # a strict auto answer holds text: it streams and parses as an unconstrained auto answer
    assert not HERMES.streams_calls(spec) and GENERIC.streams_calls(spec)
    assert HERMES.streams_calls(tool_spec({"tools": TOOLS, "tool_choice": "required"}))


@BOTH
def test_hermes_strict_grammar_frees_text_and_constrains_calls(grammars):
    g = HERMES.grammar(tool_spec({"tools": TOOLS}))
    bad = CALL.replace("Oslo", "Rome")
    assert run(grammars, g, "Let me check the weather.") == (True, True)  # text, then EOS
    assert run(grammars, g, "") == (True, True)
    assert run(grammars, g, "Let me check.\n" + CALL + "\nOne moment <b>.") == (True, True)
    assert run(grammars, g, CALL + "\n" + TIME_CALL + " done") == (True, True)  # parallel calls
    assert run(grammars, g, "see <tool_x>, <tool_cal> and </tool_call>") == (True, True)  # no call
    assert run(grammars, g, "a <tool_ b " + CALL) == (True, True)
    assert run(grammars, g, "text " + CALL[:-13]) == (True, False)  # an unfinished block cannot end
    # (nor be cut inside its forced `</tool_call>`, where the vocabulary spells it out: added, it is one token)
    assert run(grammars, g, "text " + CALL[:-5]) == ((True, False) if grammars[1].encode("</tool_call>", special=False)
                                                     != [MARK_ID + 1] else (False, False))
    for rejected in ("text " + bad, CALL.replace("get_weather", "get_nothing"), "x <tool_call> not a call",
                     CALL.replace('"unit": "C"', '"unit": "C", "extra": 1'), '<tool_call>\n{"name":"get_time"'):
        assert run(grammars, g, rejected)[0] is False, rejected
    one = HERMES.grammar(tool_spec({"tools": TOOLS, "parallel_tool_calls": False}))
    assert run(grammars, one, "a " + CALL + " b") == (True, True)
    assert run(grammars, one, "a " + CALL + " b " + TIME_CALL)[0] is False  # one call


@BOTH
def test_the_mask_forbids_an_invalid_argument(grammars):
    """The engine's row: after `"zone": 1` a `3` (13 > 12) gets -inf, `}` does not."""
    g, tok = grammars
    m = g.matcher(HERMES.grammar(tool_spec({"tools": TOOLS})))
    assert follow(g, m, "Checking. ", True)
    row = torch.zeros(CFG.vocab_size)
    allow_only(m, row)
    assert row[MARK_ID] == 0 and row[EOS] == 0  # free text: a call may begin with its one token, or the answer end
    assert m.consume_token(MARK_ID)
    assert follow(g, m, '\n{"name": "get_time", "arguments": {"zone": 1', True)
    row = torch.zeros(CFG.vocab_size)
    allow_only(m, row)
    three, close = tok.encode("3", special=False), tok.encode("}", special=False)
    assert len(three) == len(close) == 1
    assert row[three[0]] == -torch.inf and row[close[0]] == 0


@BOTH
def test_llama3_strict_grammar_is_a_call_or_text_not_opening_like_one(grammars):
    g = LLAMA3.grammar(tool_spec({"tools": TOOLS}))
    call = '{"name": "get_time", "parameters": {"zone": 3}}'
    for ok in ("Paris is sunny.", "a {b} c", "<b>bold</b>", call, "\n  " + call, "<|python_tag|>" + call,
               " <|python_tag|> " + call, ""):
        assert run(grammars, g, ok) == (True, True), ok
    for rejected in (call.replace("3", "30"), " {not json}", "<|python_tag|>hello", call + " and text",
                     '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "C"}}'):
        assert run(grammars, g, rejected)[0] is False, rejected


def test_a_strict_answer_parses_and_streams_as_an_auto_one():
    spec = tool_spec({"tools": TOOLS})
    text = "Let me check.\n" + CALL + "\nDone."
    content, calls = HERMES.parse(text, spec)
    assert content == "Let me check.\n\nDone." and [json.loads(c["function"]["arguments"]) for c in calls] == \
        [{"city": "Oslo", "unit": "C"}]
    assert HERMES.content_so_far(text, HERMES.streams_calls(spec)) == "Let me check."  # was "" (as required)


def test_tool_call_marks_in_prose_are_text():
    """Unconstrained auto: `<tool_call>` written in prose before a real call no longer swallows the call (its
    block ran to the call's `</tool_call>`), and one followed by a JSON object that names nothing is no cut call
    (its text was dropped and a whole call before it lost finish "tool_calls")."""
    from test_serve_structured import TIME, WEATHER

    spec = tool_spec({"tools": [WEATHER, TIME]})
    content, calls = HERMES.parse("Use <tool_call> tags.\n" + CALL, spec)
    assert content == "Use <tool_call> tags." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert HERMES.parse('Example: <tool_call>{"a": 1}', spec) == ('Example: <tool_call>{"a": 1}', [])
    assert not HERMES.cut(CALL + '\nFor example <tool_call>{"a": 1}', spec)
    assert HERMES.cut(CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool', spec)


@pytest.fixture(scope="module", params=["qwen2_5_tools.jinja", "llama3_tools.jinja"])
def strict_server(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("strict") / "tiny.gguf"
    cfg = dataclasses.replace(CFG, max_seq=4096)  # Llama 3's tool listing is ~1,500 byte-level tokens
    write_tiny_gguf(path, cfg, random_llama_tensors(cfg, "Q8_0", embed_qtype="Q8_0"), added=USER_DEFINED)
    s = Server(path, "--max-batch", "4", "--model-name", "tiny", "--max-tokens", "400",
               "--chat-template", str(DATA / request.param))
    s.template = request.param
    yield s
    assert s.stop() == 0


def valid(calls: list) -> None:
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        jsonschema.validate(json.loads(c["function"]["arguments"]), PARAMS[c["function"]["name"]])


def opener(server, grammars) -> int:
    """The token that opens a call: `<tool_call>` (hermes), `{` (llama3); the servers' vocabulary is grammars'."""
    if server.template.startswith("qwen"):
        return MARK_ID
    [brace] = grammars[1].encode("{", special=False)
    return brace


def test_route_returns_only_valid_calls_under_strict(strict_server, grammars):
    """A tiny random model pushed to open calls (logit_bias on `<tool_call>` for hermes, on `{` for llama3): with a
    strict tool every call it makes validates; without, its calls are junk (none parse); a non-boolean strict is
    refused (400 on the wire, as every invalid field: OpenAI's)."""
    hermes = strict_server.template.startswith("qwen")
    ask = {"messages": MSGS, "tool_choice": "auto", "max_tokens": 120, "temperature": 1.0,
           "logit_bias": {str(opener(strict_server, grammars)): 100}}
    made = 0
    for seed in range(3):
        for parallel in (True, False):
            status, _, body = strict_server.post("/v1/chat/completions", {**ask, "tools": TOOLS, "seed": seed,
                                                                           "parallel_tool_calls": parallel})
            assert status == 200, body
            c = body["choices"][0]
            calls = c["message"].get("tool_calls") or []
            valid(calls)
            made += len(calls)
            if not parallel or not hermes:
                assert len(calls) == 1, c  # the biased opener starts a call; the grammar completes it
                assert c["finish_reason"] in ("tool_calls", "length"), c
            if hermes and not parallel:
                assert "<tool_call>" not in (c["message"]["content"] or "")  # no second block
    assert made >= 6
    status, _, body = strict_server.post("/v1/chat/completions", {**ask, "tools": [WEATHER, TIME], "seed": 0})
    assert status == 200 and not body["choices"][0]["message"].get("tool_calls"), body  # free: junk, no call
    status, _, err = strict_server.post("/v1/chat/completions", {**ask, "tools": [strict(WEATHER, "yes")]})
    assert status == 400 and err["error"]["param"] == "tools" and "function.strict" in err["error"]["message"]


def test_a_strict_answer_streams_its_content_as_it_comes(strict_server, grammars):
    """Greedy, the same answer streamed: content deltas joined equal the content, calls equal the calls."""
    for bias in ({}, {str(opener(strict_server, grammars)): 100}):
        ask = {"messages": MSGS, "tools": TOOLS, "max_tokens": 60, "temperature": 0, "logit_bias": bias}
        status, _, body = strict_server.post("/v1/chat/completions", ask)
        assert status == 200, body
        msg = body["choices"][0]["message"]
        valid(msg.get("tool_calls") or [])
        events = stream(strict_server, "/v1/chat/completions", ask)
        deltas = [e["choices"][0]["delta"] for e in events[:-1] if e.get("choices")]
        assert "".join(d.get("content") or "" for d in deltas) == (msg["content"] or "")
        assert [c["function"] for c in joined_calls(events[:-1])] == [c["function"] for c in
                                                                    msg.get("tool_calls") or []]
        if not bias:  # plain text: it went out as it came, over several chunks (not all at the end)
            assert sum(1 for d in deltas if d.get("content")) > 1


def test_required_takes_the_added_opener_and_completes_the_call(grammars):
    """tool_choice required on a vocabulary with `<tool_call>` an added token: the tokenizer writes the grammar's
    `<tool_call>` with it, so the mask allows it first (llguidance allows a forced text's own tokenization), and the
    grammar takes it and goes on to a valid call (it was special to llguidance: allowed, then GrammarFailed)."""
    g, tok = grammars
    assert tok.encode("<tool_call>", special=False) == [MARK_ID]
    for spec in ({"tools": TOOLS, "tool_choice": "required"},
                 {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}):
        m = g.matcher(HERMES.grammar(tool_spec(spec)))
        assert allowed(m)[MARK_ID] and m.consume_token(MARK_ID), m.get_error()
        assert follow(g, m, TIME_CALL.removeprefix("<tool_call>"), True) and m.is_accepting()


def test_the_engine_writes_required_calls_opened_by_an_added_token(tmp_path):
    """The engine, sampled: every answer opens with the one added `<tool_call>` token and is a valid call."""
    from millis.gen import EngineConfig, SamplingParams, open_engine

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "F32"), added=USER_DEFINED)
    eng = open_engine(str(path), EngineConfig(max_batch=4, max_seq=256, threads=1))
    spec = tool_spec({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    ids = [eng.add([1, 40, 41], SamplingParams(max_tokens=120, temperature=1.0, seed=s,
                                               grammar=HERMES.grammar(spec))) for s in range(4)]
    got = {i: ["", []] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id][0] += o.text
            got[o.id][1] += o.token_ids
    for text, tokens in got.values():
        assert tokens[0] == MARK_ID, tokens
        _, calls = HERMES.parse(text, spec)
        assert len(calls) == 1 and text.endswith("</tool_call>"), text
        valid(calls)


def test_stop_is_taken_with_strict_tools_under_auto(strict_server, grammars):
    """A strict auto answer is free text with constrained calls: a stop string ends it as it ends any text (OpenAI and
    vLLM take stop with tools), one inside a call too (the call is cut, as max_tokens cuts it: not content, no
    tool_calls, no error), streamed or not; with calls-only grammars (tool_choice required) and response_format it is refused."""
    ask = {"messages": MSGS, "tools": TOOLS, "max_tokens": 60, "temperature": 0,
           "logit_bias": {str(opener(strict_server, grammars)): 100}}
    status, _, body = strict_server.post("/v1/chat/completions", ask)
    assert status == 200 and body["choices"][0]["message"].get("tool_calls"), body  # the call the stop will cut
    for stop in (['"name"'], '"name"', ["never written", '"name"']):
        status, _, body = strict_server.post("/v1/chat/completions", {**ask, "stop": stop})
        assert status == 200, body
        c = body["choices"][0]
        assert c["finish_reason"] == "stop" and not c["message"].get("tool_calls"), c
        assert '"name"' not in (c["message"]["content"] or "")
        events = stream(strict_server, "/v1/chat/completions", {**ask, "stop": stop})
        assert not any("error" in e for e in events[:-1]) and events[-1] == "[DONE]"
        chunks = [e["choices"][0] for e in events[:-1] if e.get("choices")]
        assert "".join(ch["delta"].get("content") or "" for ch in chunks) == (c["message"]["content"] or "")
        assert chunks[-1]["finish_reason"] == "stop" and not any(ch["delta"].get("tool_calls") for ch in chunks)
    plain = {"messages": MSGS, "tools": TOOLS, "max_tokens": 20, "stop": ["\n"], "temperature": 0}
    status, _, body = strict_server.post("/v1/chat/completions", plain)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls"), body
    for refused in ({"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                    {"tools": [], "response_format": {"type": "json_object"}}):
        status, _, err = strict_server.post("/v1/chat/completions", {**plain, **refused})
        assert status == 400 and err["error"]["param"] == "stop", err
    status, _, body = strict_server.post("/v1/chat/completions", {**plain, "tool_choice": "required", "stop": None,
                                                                  "max_tokens": 120})
    assert status == 200 and body["choices"][0]["message"]["tool_calls"], body  # the added opener, as a call
    valid(body["choices"][0]["message"]["tool_calls"])


def test_a_strict_auto_answer_ends_on_any_end_id(tmp_path):
    """Llama 3's `<|eot_id|>` beside its EOS: llguidance takes every end id as an EOS, so a strict auto answer's free
    text may end on it (it was masked: pushed to it, the answer ran to max_tokens) and the engine ends the request
    there ("stop", the id not in the text); a calls-only grammar still allows no end id inside a call."""
    from millis.gen import EngineConfig, SamplingParams, open_engine

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "F32"), added=USER_DEFINED + [("<|eot_id|>", 3)])
    eng = open_engine(str(path), EngineConfig(max_batch=4, max_seq=256, threads=1))
    eot, mark = CFG.vocab_size - 1, CFG.vocab_size - 3
    assert eot in eng.end_ids and eot != eng.config.eos_id and eng.tok.decode([mark]) == "<tool_call>"
    bias = ((eot, 100.0),)
    for fmt in (HERMES, LLAMA3):
        spec = tool_spec({"tools": TOOLS})
        ids = [eng.add([1, 40, 41], SamplingParams(max_tokens=30, temperature=1.0, seed=s, logit_bias=bias,
                                                   grammar=fmt.grammar(spec))) for s in range(2)]
        got = {i: [[], None] for i in ids}
        while eng.has_work:
            for o in eng.step():
                got[o.id][0] += o.token_ids
                got[o.id][1] = o.finished or got[o.id][1]
        assert all(v == [[eot], "stop"] for v in got.values()), (fmt.name, got)
    g = eng.grammars
    m = g.matcher(HERMES.grammar(tool_spec({"tools": TOOLS})))
    assert follow(g, m, "Hello there", True) and allowed(m)[eot] and allowed(m)[EOS] and m.is_accepting()
    assert m.consume_token(eot) and m.is_stopped()
    required = HERMES.grammar(tool_spec({"tools": TOOLS, "tool_choice": "required"}))
    m = g.matcher(required)
    assert m.consume_token(mark) and follow(g, m, '\n{"name": "get_time", "arguments": {"zone": 1', True)
    assert not m.is_accepting() and not allowed(m)[eot] and not allowed(m)[EOS]
    ids = [eng.add([1, 40, 41], SamplingParams(max_tokens=150, temperature=1.0, seed=s, logit_bias=bias,
                                               grammar=required)) for s in range(3)]
    got = {i: ["", [], None] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id][0] += o.text
            got[o.id][1] += o.token_ids
            got[o.id][2] = o.finished or got[o.id][2]
    required_spec = tool_spec({"tools": TOOLS, "tool_choice": "required"})
    for text, tokens, finished in got.values():  # a whole call, then (pushed) the end id: never inside the call
        assert finished == "stop" and tokens[0] == mark and tokens[-1] == eot and eot not in tokens[:-1], tokens
        calls = HERMES.parse(text, required_spec)[1]
        assert len(calls) == 1 and text.endswith("</tool_call>"), text
        valid(calls)


def answers(text: str, finish: str, spec, fmt=HERMES, size: int = 3) -> tuple[tuple, tuple]:
    """(content, calls, finish_reason) of an answer `text` the engine ended with `finish`: as the JSON answer gives
    it, and as the event stream does (respond.events, fed `size` characters a step), content deltas joined."""
    import asyncio
    from types import SimpleNamespace

    from millis.gen import SamplingParams
    from millis.gen.request import StepOutput
    from millis.serve.generation import schemas as gs
    from millis.serve.generation.respond import _answer, events

    parts = [text[k:k + size] for k in range(0, len(text), size)] or [""]
    outs = [StepOutput("r", [0], t, finish if k == len(parts) - 1 else None) for k, t in enumerate(parts)]
    g = gs.GenRequest(None, [], SamplingParams(max_tokens=100, grammar=fmt.grammar(spec) or ""), True, False,
                      tools=spec, tool_format=fmt)
    rest = iter(outs[1:])

    async def next_out(live):
        return next(rest)

    st = SimpleNamespace(next=next_out, engine=SimpleNamespace(tok=None), name="tiny")
    live = SimpleNamespace(id="r", prompt_tokens=3, n_out=len(outs))

    async def run_events():
        return [json.loads(e[6:]) for e in [e async for e in events(st, [live], [outs[0]], g, True)][:-1]]

    chunks = [e["choices"][0] for e in asyncio.run(run_events())]
    content = "".join(ch["delta"].get("content") or "" for ch in chunks) or None
    calls = [c["function"] for c in joined_calls([{"choices": [ch]} for ch in chunks])]
    content_, calls_, finish_ = _answer(g, text, finish)
    return (content_, [c["function"] for c in calls_], finish_), (content, calls, chunks[-1]["finish_reason"])


@pytest.mark.parametrize("strict_", [True, False], ids=["strict", "free"])
def test_text_after_a_call_streams_as_it_is_answered(strict_):
    """An auto answer with text after its call: the stream sends that text too (it sent only the text before the
    call), after what went out as it came; streamed and not, the same content and calls. Whitespace before a call
    is held back (parse drops it: the stream sent `Let me check.\\n`, the answer `Let me check.`)."""
    spec = tool_spec({"tools": TOOLS if strict_ else [WEATHER, TIME]})
    weather = {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}
    for text, content in (("Let me check.\n" + CALL + "\nDone.", "Let me check.\n\nDone."),
                          ("Let me check.\n" + CALL, "Let me check."), ("\n" + CALL + "\nDone.", "Done."),
                          ("  Hi " + CALL + " and " + TIME_CALL + " bye\n", "  Hi  and  bye")):
        for size in (1, 4, 200):
            plain, streamed = answers(text, "stop", spec, size=size)
            assert plain == streamed, (text, size, plain, streamed)
            assert plain[0] == content and plain[1][0] == weather and plain[2] == "tool_calls"
    for text in ("Paris is sunny.\n", "  a <tool_cal", "see <tool_call> tags"):
        assert answers(text, "stop", spec)[0] == answers(text, "stop", spec)[1] == (text, [], "stop")


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_a_call_cut_after_whole_ones_is_dropped_and_the_finish_stays(finish):
    """A stop string or max_tokens cutting a call after a whole one: the whole call is returned, the cut one is call
    syntax, not content (it came back as content `<tool_call>\\n{"name": "get_ti`), and the finish_reason is the
    engine's, never "tool_calls" (it said "tool_calls" for a stop string); streamed and not, the same."""
    weather = {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}
    for spec in (tool_spec({"tools": TOOLS}), tool_spec({"tools": [WEATHER, TIME]})):
        for text, content, calls in (
                ("Sure. " + CALL + '\n<tool_call>\n{"name": "get_ti', "Sure.", [weather]),
                (CALL + "\n<tool_call>", None, [weather]),
                (CALL + "\n" + TIME_CALL[:-4], None, [weather]),  # its JSON whole, its `</tool_call>` not
                ("Let me see. " + CALL[:30], "Let me see.", []),
                (CALL[:12], None, [])):
            plain, streamed = answers(text, finish, spec)
            assert plain == streamed == (content, calls, finish), (text, plain, streamed)

"""The OpenAI surface beyond plain text, on a served GGUF model: response_format json_object /
json_schema (every answer parses and validates, streamed too), tools and tool_choice (tool_calls
parsed, arguments valid under the tool's parameters, also when streaming), n choices (distinct when
sampled, seeded reproducibly), and the 400s that name the field."""
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf
from test_serve import Server, _metric
from test_serve_gen import stream

from millis.gen.config import LlamaConfig

pytestmark = pytest.mark.serve
CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=1024, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)
SCHEMA = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "note": {"type": "string", "maxLength": 8}}, "required": ["city", "days", "note"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
DEEP = '{"type": "array", "items": ' * 1000 + "{}" + "}" * 1000  # JSON past Python's recursion limit: sent as text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured") / "tiny.gguf"
    write_tiny_gguf(str(path), CFG, random_llama_tensors(CFG, "Q8_0", embed_qtype="Q8_0"))
    s = Server(path, "--max-batch", "4", "--model-name", "tiny", "--max-tokens", "400")
    yield s
    assert s.stop() == 0


def test_json_schema_answers_parse_and_validate(server):
    rf = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        status, _, body = server.post("/v1/chat/completions", {"messages": MSGS, "response_format": rf, "seed": seed,
                                                                "temperature": 1.0, "max_tokens": 300})
        assert status == 200, body
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
        assert body["choices"][0]["finish_reason"] == "stop"
    # seeded: unseeded streams are drawn anew each server start, and a draw may spend 300 tokens in whitespace
    events = stream(server, "/v1/completions", {"prompt": "trip:", "response_format": rf, "max_tokens": 300, "seed": 0})
    jsonschema.validate(json.loads("".join(e["choices"][0]["text"] for e in events[:-1])), SCHEMA)
    status, _, body = server.post("/v1/chat/completions", {"messages": MSGS, "max_tokens": 300, "seed": 0,
                                                            "response_format": {"type": "json_object"}})
    assert status == 200 and body["choices"][0]["message"]["content"].startswith("{")


def check_calls(calls: list, tools: list) -> None:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        jsonschema.validate(json.loads(c["function"]["arguments"]), by_name[c["function"]["name"]])


def joined_calls(events: list) -> list:
    """Streamed tool call deltas -> whole calls: each announced once (id, type, name), then its arguments'
    parts, in order."""
    calls: list = []
    for e in events:
        for d in e["choices"][0]["delta"].get("tool_calls", []):
            if d["index"] == len(calls):
                assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"]
                calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
                calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return calls


def test_tool_calls_parse_and_validate_also_streamed(server):
    tools = [WEATHER, TIME]
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_time"}}] * 2):
        status, _, body = server.post("/v1/chat/completions", {
            "messages": MSGS, "tools": tools, "tool_choice": choice, "seed": seed, "temperature": 1.0,
            "parallel_tool_calls": False, "max_tokens": 300})
        assert status == 200, body
        c = body["choices"][0]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        check_calls(c["message"]["tool_calls"], tools)
        assert len(c["message"]["tool_calls"]) == 1
        if isinstance(choice, dict):
            assert c["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    # streamed: the call announced once, its arguments in parts, joined equal to the same greedy answer's
    greedy = {"messages": MSGS, "tools": tools, "tool_choice": "required", "temperature": 0, "max_tokens": 300,
              "parallel_tool_calls": False}
    events = stream(server, "/v1/chat/completions", greedy)
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    calls = joined_calls(events[:-1])
    check_calls(calls, tools)
    parts = [d for e in events[:-1] for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert len(parts) > len(calls) + 1, parts  # arguments streamed in pieces, not whole at the end
    _, _, body = server.post("/v1/chat/completions", greedy)
    assert [c["function"] for c in body["choices"][0]["message"]["tool_calls"]] == [c["function"] for c in calls]
    # logprobs with tools, streamed: every token's, as unstreamed (the tools branch sent none)
    _, _, whole = server.post("/v1/chat/completions", {**greedy, "logprobs": True})
    events = stream(server, "/v1/chat/completions", {**greedy, "logprobs": True})
    streamed = [c["token"] for e in events[:-1] for ch in e["choices"] if ch.get("logprobs")
                for c in ch["logprobs"]["content"]]
    assert streamed == [c["token"] for c in whole["choices"][0]["logprobs"]["content"]]
    assert len(streamed) == whole["usage"]["completion_tokens"]
    # auto: a call or an answer, never anything else; the conversation goes on with the tool's result
    # (seeded: the server draws unseeded streams anew each start; a call cut by max_tokens ends "length", as given)
    status, _, body = server.post("/v1/chat/completions", {"messages": MSGS, "tools": tools, "max_tokens": 300,
                                                           "seed": 0})
    c = body["choices"][0]
    assert status == 200 and c["finish_reason"] in ("tool_calls", "stop", "length")
    assert (c["finish_reason"] == "tool_calls") == bool(c["message"].get("tool_calls")) or c["finish_reason"] == "length"
    if c["finish_reason"] == "tool_calls":
        check_calls(c["message"]["tool_calls"], tools)
    follow = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    status, _, body = server.post("/v1/chat/completions", {"messages": follow, "tools": tools, "tool_choice": "none",
                                                            "max_tokens": 8})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_response_format_beside_tools_is_calls_or_its_json(server):
    """tools with response_format (the generic format: the tiny model's template shows no tools): under auto the
    answer is calls or content that is response_format's JSON (it was a 400). Pushed to answer (logit_bias on `r`:
    {"response" against {"tool_calls"), the content validates and streams as written, joined equal to the whole
    answer's; sampled, every answer is one of the two; tool_choice required gives calls; stop is refused beside
    them (it would cut the JSON)."""
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
            "additionalProperties": False}  # small: the system message shows it to a byte-level 1,024-token context
    rf = {"type": "json_schema", "json_schema": {"name": "trip", "schema": city, "strict": True}}
    tools = [WEATHER, TIME]
    _, _, tok = server.post("/tokenize", {"prompt": "r"})
    plain = {"messages": MSGS, "tools": tools, "response_format": rf, "max_tokens": 200}
    ask = {**plain, "temperature": 0, "logit_bias": {str(tok["tokens"][-1]): 100}}
    status, _, body = server.post("/v1/chat/completions", ask)
    assert status == 200, body
    c = body["choices"][0]
    assert c["finish_reason"] == "stop" and not c["message"].get("tool_calls"), c
    jsonschema.validate(json.loads(c["message"]["content"]), city)
    events = stream(server, "/v1/chat/completions", ask)
    parts = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e.get("choices")]
    assert "".join(p for p in parts if p) == c["message"]["content"]
    assert len([p for p in parts if p]) > 1 and events[-2]["choices"][0]["finish_reason"] == "stop"  # as written
    for seed in range(3):
        status, _, body = server.post("/v1/chat/completions", {**plain, "temperature": 1.0, "seed": seed})
        c = body["choices"][0]
        assert status == 200 and c["finish_reason"] in ("stop", "tool_calls", "length"), body
        if c["finish_reason"] == "tool_calls":
            check_calls(c["message"]["tool_calls"], tools)
        elif c["finish_reason"] == "stop":
            jsonschema.validate(json.loads(c["message"]["content"]), city)
    status, _, body = server.post("/v1/chat/completions", {**plain, "tool_choice": "required", "temperature": 0,
                                                            "parallel_tool_calls": False})
    assert status == 200 and body["choices"][0]["finish_reason"] == "tool_calls", body
    check_calls(body["choices"][0]["message"]["tool_calls"], tools)
    status, _, err = server.post("/v1/chat/completions", {**ask, "stop": ["}"]})
    assert status == 400 and err["error"]["param"] == "stop", err
    # /tokenize counts what the chat route sends, the schema's line in the system message too
    _, _, counted = server.post("/tokenize", {"messages": MSGS, "tools": tools, "response_format": rf})
    _, _, without = server.post("/tokenize", {"messages": MSGS, "tools": tools})
    _, _, sent = server.post("/v1/chat/completions", {**plain, "max_tokens": 1})
    assert counted["count"] == sent["usage"]["prompt_tokens"] > without["count"], (counted, sent["usage"])


def test_tool_parameters_with_defs_and_refs_compile_and_validate(server):
    """Pydantic writes tool parameters with $defs / $ref: nested in the answer's schema, "#/$defs/City" pointed
    at the answer's root and every such tool was a 400."""
    city = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
            "additionalProperties": False}
    trip = {"type": "function", "function": {"name": "plan_trip", "parameters": {
        "$defs": {"City": city}, "type": "object", "properties": {"to": {"$ref": "#/$defs/City"}},
        "required": ["to"], "additionalProperties": False}}}
    for seed in range(3):
        status, _, body = server.post("/v1/chat/completions", {
            "messages": MSGS, "tools": [trip], "tool_choice": "required", "seed": seed, "temperature": 1.0,
            "max_tokens": 200})
        assert status == 200, body
        c = body["choices"][0]
        if c["finish_reason"] == "tool_calls":
            check_calls(c["message"]["tool_calls"], [trip])


def test_a_tool_without_parameters_takes_no_arguments_and_a_calls_only_stream_opens_with_null_content(server):
    """OpenAI reads a tool without `parameters` as one without arguments: an open object let the model invent
    keys ('{"time": "12:59:22", ...', cut by max_tokens). A stream that can only be calls opens with content
    null, as OpenAI's (it was "", and the SDK's stream helper emitted a content event)."""
    ping = {"type": "function", "function": {"name": "ping"}}
    whole = 0
    for seed in range(3):
        status, _, body = server.post("/v1/chat/completions", {"messages": MSGS, "tools": [ping], "seed": seed,
                                                                "tool_choice": "required", "temperature": 1.0,
                                                                "max_tokens": 300, "parallel_tool_calls": False})
        c = body["choices"][0]
        assert status == 200 and c["message"]["tool_calls"], body
        if c["finish_reason"] == "tool_calls":
            whole += 1
            assert all(json.loads(t["function"]["arguments"]) == {} for t in c["message"]["tool_calls"]), body
    assert whole >= 1
    events = stream(server, "/v1/chat/completions", {"messages": MSGS, "tools": [ping], "tool_choice": "required",
                                                     "temperature": 0, "max_tokens": 300})
    first = events[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}, first
    events = stream(server, "/v1/chat/completions", {"messages": MSGS, "temperature": 0, "max_tokens": 4})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # a text answer: as before


def test_n_choices_are_distinct_seeded_and_reproducible(server):
    body = {"prompt": "once upon a time", "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 12, "ignore_eos": True}
    status, _, a = server.post("/v1/completions", body)
    assert status == 200, a
    texts = [c["text"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert a["usage"]["completion_tokens"] == 36
    assert [c["text"] for c in server.post("/v1/completions", body)[2]["choices"]] == texts
    events = stream(server, "/v1/completions", body)
    joined = ["".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i)
              for i in range(3)]
    assert joined == texts
    status, _, g = server.post("/v1/completions", {**body, "temperature": 0})  # greedy: n equal choices
    assert len({c["text"] for c in g["choices"]}) == 1


@pytest.mark.parametrize("route, extra, param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ("/v1/chat/completions", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "no-such-type"}}}]}, "tools"),
    ("/v1/completions", {"tools": [WEATHER]}, "tools"),
    ("/v1/completions", {"n": 17}, "n"),
    ("/v1/completions", {"n": 5}, "n"),  # over --max-batch 4: the fifth choice could start only after a whole one
    *[(route, {"messages": [{"role": "assistant", "tool_calls": calls}, *MSGS]}, "messages")
      for route in ("/v1/chat/completions", "/tokenize")
      for calls in ([{"function": "f"}], 5, [{"function": None}], [{"function": {"name": "f", "arguments": 5}}])],
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": "$deep"}}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "$deep"}}]},
     "tools"),
    # compiles, but outgrows llguidance's parser at the first token (it was a 500 quoting the whole grammar)
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1800)}}}}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "$deep"}}]}, *MSGS]}, "messages"),
    # a stop string cut the promised JSON and still said "stop" ('{\n\t\r' for stop '"')
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "stop": ['"']}, "stop"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "stop": [":"]}, "stop"),
    ("/v1/completions", {"response_format": {"type": "json_object"}, "stop": ","}, "stop"),
    # bounds a grammar over doubles cannot keep (minimum 2^53 + 1 gave 9007199254741000, past the maximum)
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 9007199254740993, "maximum": 9007199254740999}}}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "number", "exclusiveMinimum": 0.1, "exclusiveMaximum": 0.10000000000000002}}}}, "response_format"),
])
def test_bad_structured_requests_are_400_naming_the_field(server, route, extra, param):
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": MSGS}
    status, _, err = server.post(route, raw=json.dumps({**body, **extra}).replace('"$deep"', DEEP).encode())
    assert status == 400 and err["error"]["param"] == param, err


def test_millis_bench_times_streamed_generation(server, tmp_path):
    """`millis bench` on a generation server: streamed chat requests with a shared system prompt, each
    timed token by token; usage tokens match what the server generated."""
    from millis.loadgen import BenchConfig, bench

    (tmp_path / "q.txt").write_text("where is my card?\nhow do I top up?\nwhy was I charged twice?\n")
    (tmp_path / "system.txt").write_text("You are a bank's support assistant. " * 20)
    res = bench(BenchConfig(url=server.url, data=str(tmp_path / "q.txt"), concurrency="2", rate="4", duration=3,
                            max_tokens=6, system=str(tmp_path / "system.txt"), out=str(tmp_path / "out")))
    assert res["route"] == "/v1/chat/completions" and [r["load"] for r in res["rows"]] == ["c2", "r4"]
    for r in res["rows"]:
        assert r["ok"] == r["sent"] > 0 and r["errors"] == r["timeouts"] == 0, r
        assert 0 < r["output_tokens"] <= 6 * r["ok"] and r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] > 0
        assert 0 <= r["goodput"] <= 1 and r["output_tok_s"] > 0
    assert (tmp_path / "out" / "bench.json").is_file()


# ------------------------------------------------------------------ templates with their own tool syntax
DATA = Path(__file__).parent / "data"


def test_tool_formats_follow_the_template():
    """Qwen2.5's template (Hermes `<tool_call>`) and Llama 3's ("Given the following functions") get
    the tools through the template and earlier calls as their own syntax; others get the generic JSON."""
    from millis.gen.chat_template import render_chat
    from millis.serve.generation.tool_formats import GENERIC, HERMES, LLAMA3, tool_format
    from millis.serve.generation.tools import tool_spec

    qwen, llama = (DATA / "qwen2_5_tools.jinja").read_text(), (DATA / "llama3_tools.jinja").read_text()
    assert (tool_format(qwen), tool_format(llama), tool_format("{{ messages }}"), tool_format(None)) == \
        (HERMES, LLAMA3, GENERIC, GENERIC)
    spec = tool_spec({"tools": [WEATHER, TIME]})
    history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    msgs, tools = HERMES.conversation(history, spec)
    text = render_chat(qwen, msgs, {}, tools)
    assert '"name": "get_time"' in text and "<tools>" in text  # the tools, as the template lists them
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text
    msgs, tools = LLAMA3.conversation(history, spec)
    text = render_chat(llama, msgs, {"bos_token": "<s>"}, tools)
    assert "Given the following functions" in text and '"get_time"' in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}' in text


def test_native_tool_calls_are_parsed_back():
    from millis.serve.generation.tool_formats import GENERIC, HERMES, LLAMA3
    from millis.serve.generation.tool_stream import CallStream, string_end, value_end
    from millis.serve.generation.tools import tool_spec

    spec = tool_spec({"tools": [WEATHER, TIME]})
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call><tool_call>{broken</tool_call>')
    content, calls = HERMES.parse(text, spec)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"] and content == "Let me check."
    inside = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "see </tool_call> here"}}\n</tool_call>'
    rest, found = HERMES.parse("A " + inside + " B", spec)  # the regex's first </tool_call> lost the call
    assert rest == "A  B" and json.loads(found[0]["function"]["arguments"]) == {"zone": "see </tool_call> here"}
    # a generic answer cut in its response: the string as far as written, as streamed (was the wire JSON)
    assert GENERIC.parse('{\n "response" : "Hello, wor', spec) == ("Hello, wor", [])
    assert GENERIC.parse('{\n  ', spec) == (None, [])
    assert json.loads(calls[1]["function"]["arguments"]) == {"zone": 1}
    one = tool_spec({"tools": [WEATHER, TIME], "parallel_tool_calls": False})
    assert len(HERMES.parse(text, one)[1]) == 1
    assert HERMES.parse("Paris is sunny.", spec) == ("Paris is sunny.", [])
    content, calls = LLAMA3.parse('<|python_tag|>{"name": "get_time", "parameters": {"zone": -3}}', spec)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": -3}
    assert LLAMA3.parse('{"name": "nope", "parameters": {}}', spec)[1] == []
    # streaming: every prefix's calls and content only grow, and end as the parsed answer's
    answers = [(HERMES, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"C"}}\n</tool_call>\n'
                        '<tool_call>\n{"name":"get_time","arguments":{"zone":-1}}\n</tool_call>'),
               (LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {"zone": 3}}'),
               (GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}, '
                         '{"name": "get_time", "arguments": {"zone": 12}}]}')]
    for fmt, text in answers:
        stream_calls, shown = CallStream(), ""
        deltas = [d for n in range(len(text) + 1) for d in stream_calls.update(fmt.spans(text[:n]))]
        joined = joined_calls([{"choices": [{"delta": {"tool_calls": [d]}}]} for d in deltas])
        assert [c["function"] for c in joined] == [c["function"] for c in fmt.parse(text, spec)[1]], fmt.name
    text = '{"response": "caf\\u00e9 \\ud83d\\ude00 \\"ok\\"\\n"}'
    for n in range(len(text) + 1):
        now = GENERIC.content_so_far(text[:n], True)
        assert now.startswith(shown), (shown, now)
        shown = now
    assert shown == GENERIC.parse(text, spec)[0] == 'caf\u00e9 \U0001F600 "ok"\n'
    assert CallStream().update(GENERIC.spans('{"tool_calls": [{"arguments": {"a"')) == []  # no name yet
    # the scanner: a string ends at a quote after an even run of backslashes; a value at its closing bracket
    assert [string_end(t, 0) for t in ('"ab\\"c"x', '"ab\\', '"ab\\"', '"a\\\\"b', '"\\\\\\""x', '""')] == \
        [7, None, None, 5, 6, 2]
    assert value_end('{"a": "}", "b": [1, {"c": 2}]} tail', 0) == 30
    assert value_end('{"a": "}", "b": [1, {"c": 2}]', 0) is None and value_end("12", 0) is None
    # streaming auto answers: text that cannot belong to a call goes out as it comes
    assert HERMES.streamable("Let me check.\n<tool_c", False) == len("Let me check.\n")
    assert HERMES.streamable("ab<tool_call>{", False) == 2 and HERMES.streamable("plain <b>", False) == 9
    assert HERMES.streamable("anything", True) == 0  # constrained: all of it is the call
    assert LLAMA3.streamable("Paris is sunny", False) == 14
    assert [LLAMA3.streamable(t, False) for t in ("  {", "<|python", "<|python_tag|>{", " ")] == [0, 0, 0, 0]


@pytest.fixture(scope="module", params=["qwen2_5_tools.jinja", "llama3_tools.jinja"])
def native_server(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("native") / "tiny.gguf"
    cfg = dataclasses.replace(CFG, max_seq=4096)  # Llama 3's tool listing is ~1,500 byte-level tokens
    write_tiny_gguf(str(path), cfg, random_llama_tensors(cfg, "Q8_0", embed_qtype="Q8_0"))
    s = Server(path, "--max-batch", "4", "--model-name", "tiny", "--max-tokens", "400",
               "--chat-template", str(DATA / request.param))
    yield s
    assert s.stop() == 0


def test_native_template_calls_parse_and_validate_also_streamed(native_server):
    """Through Qwen2.5's template (`<tool_call>` blocks) and Llama 3's (one JSON call): required / named
    choices are constrained to the template's call syntax, whose JSON names a tool and validates against
    its parameters; streamed the same; auto answers freely."""
    hermes_server = native_server
    tools = [WEATHER, TIME]
    for seed, (choice, parallel) in enumerate([("required", True), ("required", False),
                                               ({"type": "function", "function": {"name": "get_time"}}, False)]):
        status, _, body = hermes_server.post("/v1/chat/completions", {
            "messages": MSGS, "tools": tools, "tool_choice": choice, "seed": seed, "temperature": 1.0,
            "parallel_tool_calls": parallel, "max_tokens": 300})
        assert status == 200, body
        c = body["choices"][0]
        # one call ends the answer; parallel calls may go on until max_tokens (the whole blocks still parse)
        assert c["finish_reason"] == "tool_calls" or (parallel and c["finish_reason"] == "length"), c
        assert "tool_calls" in c["message"], c
        check_calls(c["message"]["tool_calls"], tools)
        if not parallel:
            assert len(c["message"]["tool_calls"]) == 1
        if isinstance(choice, dict):
            assert c["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    greedy = {"messages": MSGS, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False,
              "max_tokens": 300, "temperature": 0}
    events = stream(hermes_server, "/v1/chat/completions", greedy)
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    calls = joined_calls(events[:-1])
    check_calls(calls, tools)
    _, _, body = hermes_server.post("/v1/chat/completions", greedy)
    assert [c["function"] for c in body["choices"][0]["message"]["tool_calls"]] == [c["function"] for c in calls]
    auto = {"messages": MSGS, "tools": tools, "max_tokens": 16, "temperature": 0}
    status, _, body = hermes_server.post("/v1/chat/completions", auto)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    events = stream(hermes_server, "/v1/chat/completions", auto)  # the same greedy answer, streamed
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    msg = body["choices"][0]["message"]
    if not msg.get("tool_calls"):
        assert "".join(d.get("content") or "" for d in deltas) == msg["content"]


def test_tokenize_counts_what_the_chat_route_sends(native_server):
    """An earlier tool call is shown in the template's own syntax on /tokenize as on the chat route."""
    history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    status, _, tok = native_server.post("/tokenize", {"messages": history})
    _, _, chat = native_server.post("/v1/chat/completions", {"messages": history, "max_tokens": 1})
    assert status == 200 and tok["count"] == chat["usage"]["prompt_tokens"], (tok, chat)


def test_a_lone_surrogate_in_arguments_is_a_400(native_server):
    """Escaped in the JSON text it passes the body's parser; the template's tojson writes it raw."""
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "\\ud800"}'}}]
    msgs = MSGS + [{"role": "assistant", "content": None, "tool_calls": calls}]
    for route in ("/v1/chat/completions", "/tokenize"):
        status, _, err = native_server.post(route, {"messages": msgs})
        assert status == 400 and err["error"]["param"] == "messages", (route, err)


def test_tokenize_counts_the_tools_as_the_chat_route_does(server):
    """The tools are shown to the model (the template's tools, or a system message): /tokenize of messages and
    tools counts what /v1/chat/completions sends, which without them it did not (34 against 108 on SmolLM2)."""
    ask = {"messages": MSGS, "tools": [WEATHER, TIME], "tool_choice": "auto"}
    status, _, tok = server.post("/tokenize", ask)
    _, _, bare = server.post("/tokenize", {"messages": MSGS})
    status2, _, body = server.post("/v1/chat/completions", {**ask, "max_tokens": 1, "temperature": 0})
    assert status == status2 == 200, (tok, body)
    assert tok["count"] == body["usage"]["prompt_tokens"] > bare["count"]


def test_a_small_kv_pool_bounds_max_tokens_and_requests_share_it(tmp_path):
    """A GGUF model's context (1,024 here) within a KV pool of less: the card's max_model_len is the pool's, a
    max_tokens past it a 400 naming max_tokens (it was cut at the pool without a word), and two requests that
    each fill most of the pool both finish: blocks are taken as they are written, the newer preempted."""
    cfg = dataclasses.replace(CFG, dim=128, n_layers=4, n_kv_heads=4, hidden_dim=256)  # 4 KB of KV a position
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(path), cfg, random_llama_tensors(cfg, "Q8_0", embed_qtype="Q8_0"))
    s = Server(path, "--max-batch", "2", "--kv-memory-mb", "1", "--max-tokens", "16")
    try:
        ctx = s.get("/v1/models/" + path.name)[1]
        ctx = json.loads(ctx)["max_model_len"]
        assert 64 <= ctx < CFG.max_seq
        status, _, err = s.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": ctx + 1})
        assert status == 400 and err["error"]["param"] == "max_tokens"
        ask = {"max_tokens": ctx * 3 // 4, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: s.post("/v1/completions", {"prompt": p, **ask}), ([1, 5], [1, 6])))
        assert [(a[0], a[2]["usage"]["completion_tokens"]) for a in answers] == [(200, ask["max_tokens"])] * 2
        assert _metric(s, "millis_preempted_requests_total") >= 1
    finally:
        assert s.stop() == 0

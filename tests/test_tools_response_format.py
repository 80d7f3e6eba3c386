"""response_format beside tools under tool_choice auto: the answer is calls of the request's tools, or content that
is JSON following response_format's schema, and nothing else, in each tool format (generic's JSON envelope, hermes
blocks, Llama 3's one call): the grammars driven token by token, the answers parsed back, the generic format's
content streamed as written (each prefix's content a prefix of the whole answer's)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import test_tool_strict
from test_tool_strict import CALL, TIME_CALL, run

from millis.serve.generation.schemas import GenLimits, chat_request, response_schema
from millis.serve.generation.tool_formats import GENERIC, HERMES, LLAMA3
from millis.serve.generation.tools import tool_spec
from millis.serve.schemas import ApiError
from test_serve_structured import TIME, WEATHER

ANSWER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
          "additionalProperties": False}
L_CALL = '{"name": "get_time", "parameters": {"zone": -3}}'
grammars = test_tool_strict.grammars  # the fixture: a tiny engine's Grammars with `<tool_call>` one token
# as Pydantic writes a model with a nested type
DEFS = {"$defs": {"City": {"enum": ["Paris", "Rome"]}}, "type": "object",
        "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"], "additionalProperties": False}


def spec(**body):
    return spec_with(ANSWER, **body)


def spec_with(answer, **body):
    return dataclasses.replace(tool_spec({"tools": [WEATHER, TIME], **body}), answer=answer)


def test_response_schema_reads_each_form():
    assert response_schema({}) is None and response_schema({"response_format": {"type": "text"}}) is None
    assert response_schema({"response_format": {"type": "json_object"}}) == {"type": "object"}
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER, "strict": True}}
    assert response_schema({"response_format": rf}) == ANSWER
    with pytest.raises(ApiError) as e:
        response_schema({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}})
    assert e.value.param == "response_format"


def test_generic_grammar_takes_calls_or_the_schema_json(grammars):
    g = GENERIC.grammar(spec())
    assert run(grammars, g, '{"response": {"city": "Rome"}}') == (True, True)
    assert run(grammars, g, '{"tool_calls": [{"name": "get_time", "arguments": {"zone": 3}}]}') == (True, True)
    for bad in ('{"response": "Rome"}', '{"response": {"city": "Oslo"}}', '{"response": {}}', "Rome"):
        assert run(grammars, g, bad)[0] is False, bad
    assert "following this schema" in spec().system_text() and "schema" not in tool_spec(
        {"tools": [WEATHER, TIME]}).system_text()


def test_hermes_grammar_takes_blocks_or_the_schema_json(grammars):
    g = HERMES.grammar(spec())
    for ok in ('{"city": "Paris"}', CALL, CALL + "\n" + TIME_CALL):
        assert run(grammars, g, ok) == (True, True), ok
    for bad in ("Let me check.", '{"city": "Oslo"}', CALL + " done", '{"city": "Paris"}' + CALL, '"Paris"',
                "Sure: " + CALL):
        assert run(grammars, g, bad)[0] is False, bad
    one = HERMES.grammar(spec(parallel_tool_calls=False))
    assert run(grammars, one, CALL) == (True, True) and run(grammars, one, CALL + "\n" + TIME_CALL)[0] is False


def test_llama3_grammar_takes_a_call_or_the_schema_json(grammars):
    g = LLAMA3.grammar(spec())
    for ok in ('{"city": "Rome"}', L_CALL, "<|python_tag|>" + L_CALL):
        assert run(grammars, g, ok) == (True, True), ok
    for bad in ("Sure.", '{"city": "Oslo"}', L_CALL + L_CALL, L_CALL + " and text",
                "<|python_tag|>" + '{"city": "Rome"}'):
        assert run(grammars, g, bad)[0] is False, bad


def test_answers_parse_to_content_as_written_or_calls():
    s = spec()
    assert GENERIC.parse('{"response": {"city": "Rome"}}', s) == ('{"city": "Rome"}', [])
    text = '{"tool_calls": [{"name": "get_time", "arguments": {"zone": 3}}]}'
    content, calls = GENERIC.parse(text, s)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time"]
    # a string schema's content is its JSON text, quotes and escapes as written (not the decoded string)
    as_string = dataclasses.replace(s, answer={"type": "string"})
    assert GENERIC.parse('{"response": "a \\"b\\""}', as_string) == ('"a \\"b\\""', [])
    assert GENERIC.parse('{"response": "a"}', tool_spec({"tools": [WEATHER]})) == ("a", [])  # no response_format
    assert HERMES.parse('{"city": "Paris"}', s) == ('{"city": "Paris"}', [])
    assert HERMES.parse('{"city": "<tool_call>"}', s) == ('{"city": "<tool_call>"}', [])  # a string, not a block
    assert not HERMES.cut('{"city": "<tool_call>', s)
    content, calls = HERMES.parse(CALL + "\n" + TIME_CALL, s)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert LLAMA3.parse('{"city": "Rome"}', s) == ('{"city": "Rome"}', [])
    content, calls = LLAMA3.parse(L_CALL, s)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": -3}


def test_generic_content_streams_as_written():
    """Each prefix of an answer shows content that the next prefix's extends, ending at the parsed content: the
    value's text, never the envelope's closing brace, a number included (its end is known only at the brace)."""
    for answer, value in ((ANSWER, '{"city": "Rome", "x": [1, {"y": "}"}]}'), ({"type": "number"}, "12.5"),
                          ({"type": "string"}, '"a\\u00e9 }"')):
        s = dataclasses.replace(spec(), answer=answer)
        text = '{"response": ' + value + "}"
        for n in range(len(text) + 1):
            now = GENERIC.content_so_far(text[:n], True, True)
            assert value.startswith(now), (text[:n], now)  # what a stream sent is never taken back
        assert GENERIC.content_so_far(text, True, True) == value == GENERIC.parse(text, s)[0]


def test_the_request_shows_the_schema_and_keeps_its_refs():
    """Review findings: the generic system message was built before the schema was set (the model never saw it);
    a schema's "#/$defs/..." refs resolved against the envelope's root (a 400 naming tools); {} (any JSON) was read
    as no schema (string only)."""
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": DEFS}}
    g = chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], "response_format": rf},
                     "m", GenLimits(64, 64, 100_000))
    assert g.tools.answer == DEFS and "following this schema" in g.messages[0]["content"]
    assert "$defs" in g.messages[0]["content"]
    for fmt in (HERMES, LLAMA3):  # a native template shows the tools itself; the schema goes in the system message
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        g = chat_request({"messages": msgs, "tools": [WEATHER], "response_format": rf}, "m", GenLimits(64, 64, 100_000),
                         fmt, fmt)
        assert g.messages[0]["content"].startswith("Be brief.\n\n") and "$defs" in g.messages[0]["content"]
        assert len(g.messages) == 2 and g.template_tools
        g = chat_request({"messages": msgs, "tools": [WEATHER]}, "m", GenLimits(64, 64, 100_000), fmt, fmt)
        assert g.messages[0]["content"] == "Be brief."  # without response_format: as it was


def test_refs_and_the_empty_schema_compile_in_every_format(grammars):
    g = GENERIC.grammar(spec_with(DEFS))
    assert run(grammars, g, '{"response": {"city": "Rome"}}') == (True, True)
    assert run(grammars, g, '{"response": {"city": "Oslo"}}')[0] is False
    for fmt in (HERMES, LLAMA3):
        assert run(grammars, fmt.grammar(spec_with(DEFS)), '{"city": "Rome"}') == (True, True)
    anything = GENERIC.grammar(spec_with({}))
    for ok in ('{"response": {"a": 1}}', '{"response": 7}', '{"response": "x"}'):
        assert run(grammars, anything, ok) == (True, True), ok


def test_llama3_lead_is_bounded_blanks(grammars):
    """Before a call only JSON's blanks, at most 12 (llguidance's \\s took any Unicode blank, unbounded: a greedy model
    wrote them to max_tokens)."""
    g = LLAMA3.grammar(spec())
    assert run(grammars, g, " " * 12 + L_CALL) == (True, True)
    assert run(grammars, g, "\n <|python_tag|> " + L_CALL) == (True, True)
    for bad in (" " * 13 + L_CALL, "\u000b" + L_CALL, "\u2008" + L_CALL, "<|python_tag|>" + " " * 13 + L_CALL):
        assert run(grammars, g, bad)[0] is False, repr(bad)


def test_cut_calls_are_calls_not_content():
    """max_tokens inside a call: the call as far as written (hermes's and the generic format's rule), never call
    syntax as content; inside the mark or the tag: nothing; inside the JSON: the JSON so far."""
    s = spec()
    content, calls = LLAMA3.parse('<|python_tag|>{"name": "get_time", "parameters": {"zo', s)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time"]
    assert LLAMA3.parse("<|python_", s) == (None, []) and HERMES.parse("<tool_", s) == (None, [])
    assert LLAMA3.parse('{"city": "Ro', s) == ('{"city": "Ro', [])
    assert LLAMA3.parse('{"name": "get_time"}', dataclasses.replace(s, answer={"type": "object"})) == \
        ('{"name": "get_time"}', [])  # whole JSON that is no call: content

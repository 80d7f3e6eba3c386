"""The incremental scanner of streamed tool calls (millis.serve.generation.tool_stream.Scan): what a growing
Scan finds equals what a fresh one finds on the same prefix, for every prefix and any way the text is cut
into tokens, and a streamed answer is scanned in work proportional to its length (before, every token
rescanned the whole answer: a 23,000-character call cost 15 s of the event loop)."""
from __future__ import annotations

import json
import random

import pytest

from millis.serve.generation.tool_formats import GENERIC, HERMES, LLAMA3, string_prefix
from millis.serve.generation.tool_stream import CallStream, Scan

ARGS = {"city": "Oslo \"Nord\" \\ 😀 caf\u00e9", "days": [1, 2.5, -3e2, True, None, {"nested": ["a]", "{b"]}],
        "note": "line\nbreak \ud83d\ude00 \\u0041", "empty": {}, "list": []}
ANSWERS = [
    (GENERIC, json.dumps({"tool_calls": [{"name": "get_weather", "arguments": ARGS},
                                         {"arguments": {"zone": -1}, "name": "get_time"}]})),
    (GENERIC, json.dumps({"tool_calls": [{"name": "f", "arguments": ARGS}]}, separators=(",", ":"))),
    (GENERIC, json.dumps({"response": "caf\u00e9 \U0001F600 \"ok\"\n \\u0041 \ud83d\ude00 end"})),
    (GENERIC, json.dumps({"response": "caf\u00e9 \U0001F600"}, ensure_ascii=False)),
    (HERMES, "".join(f'<tool_call>\n{json.dumps({"name": "f", "arguments": {"i": i, **ARGS}})}\n</tool_call>\n'
                     for i in range(3))),
    (LLAMA3, '  <|python_tag|>' + json.dumps({"name": "get_time", "parameters": ARGS})),
    (LLAMA3, json.dumps({"parameters": {"zone": 3}, "name": "get_time"})),
]


def cuts(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8])
        out.append(text[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("k", range(len(ANSWERS)))
def test_growing_scan_finds_what_a_fresh_scan_finds(k):
    fmt, text = ANSWERS[k]
    for seed in range(3):
        scan, calls, deltas = Scan(), CallStream(), []
        for piece in cuts(text, random.Random(seed)):
            scan.extend(piece)
            assert fmt.spans(scan) == fmt.spans(scan.s), (seed, scan.s)
            assert fmt.content_so_far(scan, True) == fmt.content_so_far(scan.s, True), (seed, scan.s)
            deltas += calls.update(fmt.spans(scan))
        assert scan.s == text
        assert all(sp.done for sp in fmt.spans(scan))
        args: dict[int, str] = {}
        for d in deltas:
            args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
        assert [json.loads(a) for a in args.values()] == \
            [json.loads(c["function"]["arguments"]) for c in fmt.parse(text, _spec(fmt, text))[1]]


def _spec(fmt, text):
    from millis.serve.generation.tools import tool_spec

    names = {"f", "get_weather", "get_time"}
    return tool_spec({"tools": [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                                for n in sorted(names)]})


def test_response_string_streams_whole_characters_only():
    # a \\uXXXX escape cut anywhere, a surrogate pair cut between its halves: nothing half-decoded goes out
    raw = json.dumps("a\ud83d\ude00b\u00e9")[1:-1]  # a\ud83d\ude00b\u00e9
    seen = [string_prefix(raw[:n]) for n in range(len(raw) + 1)]
    assert [t for t, _ in seen] == ["", "a", "a", "a", "a", "a", "a", "a", "a", "a", "a", "a", "a",
                                    "a\U0001F600", "a\U0001F600b", *["a\U0001F600b"] * 5, "a\U0001F600b\u00e9"]
    assert all(json.loads(f'"{raw[:n]}"') == t for t, n in seen)  # the text is what its raw prefix decodes to


def test_a_long_streamed_call_costs_work_linear_in_its_length():
    """Structure characters visited over a whole streamed answer, one token (4 characters) at a time: a
    bounded multiple of its length (rescanning every prefix visits ~ length^2 / 8 here)."""
    args = json.dumps({"items": [f"x{i}" for i in range(2000)]}, separators=(",", ":"))
    for fmt, text in [(GENERIC, '{"tool_calls":[{"name":"f","arguments":' + args + '}]}'),
                      (LLAMA3, '<|python_tag|>{"name":"f","parameters":' + args + '}'),
                      (GENERIC, '{"response":' + json.dumps("a \\ \" b " * 2000) + '}')]:
        scan, calls = Scan(), CallStream()
        for i in range(0, len(text), 4):
            scan.extend(text[i:i + 4])
            fmt.content_so_far(scan, True)
            calls.update(fmt.spans(scan))
        assert scan.steps < 4 * len(text), (fmt.name, scan.steps, len(text))
        assert len(fmt.spans(scan)) == (0 if "response" in text else 1)


def test_a_mark_inside_a_calls_string_is_not_a_block():
    """`<tool_call>{` written inside an argument string (the grammar allows it) was read as the next block:
    the scan ran from that `{` into the next call and the stream died on a JSON error."""
    text = ('<tool_call>\n{"name": "get_time", "arguments": {"text": "the syntax is <tool_call>{"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"text": "<tool_call>\\n{\\"x"}}\n</tool_call>')
    for seed in range(3):
        scan, calls, deltas = Scan(), CallStream(), []
        for piece in cuts(text, random.Random(seed)):
            scan.extend(piece)
            deltas += calls.update(HERMES.spans(scan))
        args: dict[int, str] = {}
        for d in deltas:
            args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
        assert [json.loads(a) for a in args.values()] == [{"text": "the syntax is <tool_call>{"},
                                                          {"text": "<tool_call>\n{\"x"}]


def test_many_short_calls_cost_work_linear_in_the_answer(monkeypatch):
    """Each token looked at every call so far (spans and CallStream.update): 2,000 short calls were O(calls^2)."""
    counted = {"n": 0}
    real = Scan.call_span

    def counting(self, i, keys):
        counted["n"] += 1
        return real(self, i, keys)
    monkeypatch.setattr(Scan, "call_span", counting)
    call = '{"name":"f","arguments":{"a":1}}'
    for fmt, text in [(GENERIC, '{"tool_calls":[' + ",".join([call] * 500) + "]}"),
                      (HERMES, "\n".join([f"<tool_call>\n{call}\n</tool_call>"] * 500))]:
        scan, calls, tokens, n = Scan(), CallStream(), 0, 0
        counted["n"] = 0
        for i in range(0, len(text), 4):
            scan.extend(text[i:i + 4])
            n += len(calls.update(fmt.spans(scan)))
            tokens += 1
        assert len(fmt.spans(scan)) == 500 and calls.settled == 500
        assert counted["n"] < 3 * tokens, (fmt.name, counted["n"], tokens)


def test_an_answer_cut_among_its_calls_gives_the_calls_streamed_or_not():
    """max_tokens ends a generic answer inside its calls: the whole answer gives the calls as far as written, as the
    stream sent them, not the wire JSON as content (7 calls were lost, the two modes disagreed)."""
    from millis.serve.generation.tools import ToolSpec

    whole = json.dumps({"tool_calls": [{"name": "f", "arguments": {}}] * 3 + [{"name": "g", "arguments": {"x": 1}}]})
    cut = whole[:whole.rindex('"x"') + 3]  # inside the last call's arguments
    content, calls = GENERIC.parse(cut, ToolSpec(({"name": "f"}, {"name": "g"}), required=True, parallel=True))
    assert content is None and [c["function"]["name"] for c in calls] == ["f", "f", "f", "g"]
    assert [c["function"]["arguments"] for c in calls] == ["{}"] * 3 + ['{"x"']
    stream = CallStream()
    deltas = stream.update(GENERIC.spans(cut))
    assert [d["function"].get("name") for d in deltas if "name" in d["function"]] == ["f", "f", "f", "g"]


def test_calls_cut_by_a_stop_string_do_not_finish_as_tool_calls():
    """finish_reason tool_calls only when every call's arguments are whole JSON: calls cut by a stop string end "stop"
    (a client parsing their arguments failed)."""
    from types import SimpleNamespace

    from millis.serve.generation.respond import _answer
    from millis.serve.generation.tools import ToolSpec

    g = SimpleNamespace(tools=ToolSpec(({"name": "f"},), required=True, parallel=True), tool_format=GENERIC)
    whole = json.dumps({"tool_calls": [{"name": "f", "arguments": {"city": "Paris"}}]})
    assert _answer(g, whole, "stop")[2] == "tool_calls"
    content, calls, finish = _answer(g, whole[:whole.index("Paris") + 6], "stop")
    assert content is None and calls and finish == "stop"

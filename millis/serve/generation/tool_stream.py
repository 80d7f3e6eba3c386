"""Tool calls streamed as the model writes them, in OpenAI's deltas:

    {"index": k, "id": "call_...", "type": "function", "function": {"name": N, "arguments": ""}}  once N is written
    {"index": k, "function": {"arguments": "<the next characters>"}}                             as they come

The arguments are the model's own JSON text of the call's arguments value, character for character, so
the deltas joined equal the `arguments` of the same answer unstreamed (tool_formats.py reads calls with
`call_span` too). Streamed only while the answer is grammar-constrained (the generic format, a native
format under `required` or a named function): then the text is the format's syntax and a character that
belongs to an arguments value never stops belonging to it. An unconstrained answer is parsed when it ends.

The scanner is a small incremental JSON reader: it finds where values begin and (once written) end, on a
prefix of the answer, without parsing what it does not need.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

# the scans run on every streamed token over the answer so far: str.find and regexes skip the text between
# the characters that matter at C speed (a long answer costs microseconds a token, not a loop per character)
STRUCTURE = re.compile(r'["{}\[\]]')
SCALAR_END = re.compile(r'[ \t\n\r,}\]]')
BLANKS = re.compile(r"[ \t\n\r]*")


def skip_ws(s: str, i: int) -> int:
    return BLANKS.match(s, i).end()


def string_end(s: str, i: int) -> int | None:
    """s[i] is a '"': the index after its closing quote (one not escaped: an even run of backslashes before
    it), or None when s ends first."""
    j = i + 1
    while (k := s.find('"', j)) >= 0:
        b = k
        while s[b - 1] == "\\" and b - 1 > i:
            b -= 1
        if (k - b) % 2 == 0:
            return k + 1
        j = k + 1
    return None


def value_end(s: str, i: int) -> int | None:
    """The index after the JSON value that begins at s[i], or None when s ends first (a scalar at the very
    end counts as unfinished: more digits may follow)."""
    if i >= len(s):
        return None
    if s[i] == '"':
        return string_end(s, i)
    if s[i] in "{[":
        depth, j = 0, i
        while (m := STRUCTURE.search(s, j)) is not None:
            c, k = m.group(), m.start()
            if c == '"':
                e = string_end(s, k)
                if e is None:
                    return None
                j = e
                continue
            depth += 1 if c in "{[" else -1
            if depth == 0:
                return k + 1
            j = k + 1
        return None
    m = SCALAR_END.search(s, i)
    return m.start() if m else None


def object_fields(s: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The object that begins at s[i] (after blanks): {key: (value start, value end or None)} of the keys
    written so far, and the index after the object (None while unfinished)."""
    fields: dict[str, tuple[int, int | None]] = {}
    i = skip_ws(s, i)
    if i >= len(s) or s[i] != "{":
        return fields, None
    i += 1
    while True:
        i = skip_ws(s, i)
        if i >= len(s):
            return fields, None
        if s[i] == "}":
            return fields, i + 1
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            return fields, None  # not JSON (an unconstrained answer): nothing more to read
        k_end = string_end(s, i)
        if k_end is None:
            return fields, None
        key = json.loads(s[i:k_end])
        i = skip_ws(s, k_end)
        if i >= len(s) or s[i] != ":":
            return fields, None
        i = skip_ws(s, i + 1)
        if i >= len(s):
            return fields, None
        end = value_end(s, i)
        fields[key] = (i, end)
        if end is None:
            return fields, None
        i = end


def array_items(s: str, i: int) -> list[int]:
    """The start of each item written so far of the array that begins at s[i] (after blanks)."""
    i = skip_ws(s, i)
    if i >= len(s) or s[i] != "[":
        return []
    starts, i = [], i + 1
    while True:
        i = skip_ws(s, i)
        if i >= len(s) or s[i] == "]":
            return starts
        if s[i] == ",":
            i += 1
            continue
        starts.append(i)
        end = value_end(s, i)
        if end is None:
            return starts
        i = end


@dataclass(frozen=True)
class CallSpan:
    """One call as far as it is written: its name (None until the whole string is), its arguments' text so
    far, and whether the arguments value is finished."""
    name: str | None
    args: str
    done: bool


def call_span(s: str, i: int, args_keys: tuple[str, ...]) -> CallSpan | None:
    """The call object that begins at s[i]: {"name": N, <args key>: {...}} in either order."""
    fields, _ = object_fields(s, i)
    name = None
    if "name" in fields and fields["name"][1] is not None:
        v = json.loads(s[fields["name"][0]:fields["name"][1]])
        name = v if isinstance(v, str) else None
    key = next((k for k in args_keys if k in fields), None)
    if key is None:
        return CallSpan(name, "", False) if name is not None else None
    a, b = fields[key]
    return CallSpan(name, s[a:b] if b is not None else s[a:], b is not None)


def tool_call(name: str, args) -> dict:
    """An OpenAI tool_call object; arguments as a JSON string (a value is written compactly)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


class CallStream:
    """One choice's streamed calls: `update(spans)` -> the deltas the spans so far add (each call announced
    once its name is written, then its arguments' new characters)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.sent: list[int] = []

    @property
    def started(self) -> bool:
        return bool(self.ids)

    def update(self, spans: list[CallSpan]) -> list[dict]:
        deltas = []
        for k, c in enumerate(spans):
            if k == len(self.ids):
                if c.name is None:
                    break  # calls are announced in order, each once its name is known
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.sent.append(len(c.args))
                deltas.append({"index": k, "id": self.ids[k], "type": "function",
                               "function": {"name": c.name, "arguments": c.args}})
            elif len(c.args) > self.sent[k]:
                deltas.append({"index": k, "function": {"arguments": c.args[self.sent[k]:]}})
                self.sent[k] = len(c.args)
        return deltas

"""Tool calls streamed as the model writes them, in OpenAI's deltas:

    {"index": k, "id": "call_...", "type": "function", "function": {"name": N, "arguments": ""}}  once N is written
    {"index": k, "function": {"arguments": "<the next characters>"}}                             as they come

The arguments are the model's own JSON text of the call's arguments value, character for character, so
the deltas joined equal the `arguments` of the same answer unstreamed (tool_formats.py reads calls with
`call_span` too). Streamed only while the answer is grammar-constrained (the generic format, a native
format under `required` or a named function): then the text is the format's syntax and a character that
belongs to an arguments value never stops belonging to it. An unconstrained answer is parsed when it ends.

The scanner is a small incremental JSON reader: it finds where values begin and (once written) end, on a
prefix of the answer, without parsing what it does not need. A streamed answer only grows, so a `Scan`
keeps what it found (a value's end once written, an object's fields and an array's items up to the last
finished one, where an unfinished value's scan stopped): each token costs its new characters and a step per
structure still open, not the whole answer again (rescanning made a 23,000-character call 15 s of event loop).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

# str.find and regexes skip the text between the characters that matter at C speed
STRUCTURE = re.compile(r'["{}\[\]]')
SCALAR_END = re.compile(r'[ \t\n\r,}\]]')
BLANKS = re.compile(r"[ \t\n\r]*")


def skip_ws(s: str, i: int) -> int:
    return BLANKS.match(s, i).end()


@dataclass(frozen=True)
class CallSpan:
    """One call as far as it is written: its name (None until the whole string is), its arguments' text so
    far, and whether the arguments value is finished."""
    name: str | None
    args: str
    done: bool


class Scan:
    """A text that only grows (`extend`) and what the scans found in it so far. The prefix never changes, so a
    finished value's end, an object's finished fields and an array's finished items stay true; an unfinished
    value's scan resumes where it stopped. `steps` counts the structural characters visited (for tests)."""

    def __init__(self, s: str = "") -> None:
        self.s = s
        self.steps = 0
        self.ends: dict[int, int] = {}                      # value start -> the index after it (finished)
        self.resume: dict[int, object] = {}                 # value start -> where its unfinished scan stopped
        self.objects: dict[int, tuple[dict, int]] = {}      # object start -> (finished fields, index after them)
        self.closed: dict[int, int] = {}                    # object start -> the index after it, all fields read
        self.arrays: dict[int, tuple[list[int], int]] = {}  # array start -> (finished items' starts, index after)
        self.calls: dict[tuple[int, tuple[str, ...]], CallSpan] = {}  # whole calls
        self.memo: dict[str, object] = {}                   # a format's own resumable state (tool_formats.py)

    def extend(self, more: str) -> None:
        self.s += more

    def string_end(self, i: int) -> int | None:
        """s[i] is a '"': the index after its closing quote (one not escaped: an even run of backslashes
        before it), or None when s ends first."""
        if (e := self.ends.get(i)) is not None:
            return e
        s, j = self.s, self.resume.get(i, i + 1)
        while (k := s.find('"', j)) >= 0:
            self.steps += 1
            b = k
            while s[b - 1] == "\\" and b - 1 > i:
                b -= 1
            if (k - b) % 2 == 0:
                self.ends[i] = k + 1
                self.resume.pop(i, None)
                return k + 1
            j = k + 1
        self.resume[i] = len(s)  # no closing quote before it (an escaping backslash is counted from the quote back)
        return None

    def value_end(self, i: int) -> int | None:
        """The index after the JSON value that begins at s[i], or None when s ends first (a scalar at the very
        end counts as unfinished: more digits may follow)."""
        if (e := self.ends.get(i)) is not None:
            return e
        s = self.s
        if i >= len(s):
            return None
        if s[i] == '"':
            return self.string_end(i)
        if s[i] in "{[":
            return self.container_end(i)
        m = SCALAR_END.search(s, self.resume.get(i, i))
        if m is None:
            self.resume[i] = len(s)
            return None
        self.ends[i] = m.start()
        return m.start()

    def container_end(self, i: int) -> int | None:
        s = self.s
        depth, j = self.resume.get(i, (0, i))
        while (m := STRUCTURE.search(s, j)) is not None:
            self.steps += 1
            c, k = m.group(), m.start()
            if c == '"':
                e = self.string_end(k)
                if e is None:
                    self.resume[i] = (depth, k)  # inside a string: its own scan resumes
                    return None
                j = e
                continue
            depth += 1 if c in "{[" else -1
            if depth == 0:
                self.ends[i] = k + 1
                self.resume.pop(i, None)
                return k + 1
            j = k + 1
        self.resume[i] = (depth, len(s))
        return None

    def object_fields(self, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
        """The object that begins at s[i] (after blanks): {key: (value start, value end or None)} of the keys
        written so far, and the index after the object (None while unfinished)."""
        s = self.s
        i = skip_ws(s, i)
        if i >= len(s) or s[i] != "{":
            return {}, None
        done, at = self.objects.get(i, ({}, i + 1))  # fields whose values are finished; where the next begins
        if (closed := self.closed.get(i)) is not None:
            return dict(done), closed
        j = at
        while True:
            self.steps += 1
            j = skip_ws(s, j)
            if j >= len(s):
                break
            if s[j] == "}":
                self.objects[i], self.closed[i] = (done, at), j + 1
                return dict(done), j + 1
            if s[j] == ",":
                j += 1
                continue
            if s[j] != '"':
                break  # not JSON (an unconstrained answer): nothing more to read
            k_end = self.string_end(j)
            if k_end is None:
                break
            try:
                key = json.loads(s[j:k_end])
            except ValueError:  # a raw control character: not JSON
                break
            v = skip_ws(s, k_end)
            if v >= len(s) or s[v] != ":":
                break
            v = skip_ws(s, v + 1)
            if v >= len(s):
                break
            end = self.value_end(v)
            if end is None:
                self.objects[i] = (done, at)
                return {**done, key: (v, None)}, None
            done[key] = (v, end)
            at = j = end
        self.objects[i] = (done, at)
        return dict(done), None

    def array_items(self, i: int) -> list[int]:
        """The start of each item written so far of the array that begins at s[i] (after blanks)."""
        s = self.s
        i = skip_ws(s, i)
        if i >= len(s) or s[i] != "[":
            return []
        starts, at = self.arrays.get(i, ([], i + 1))  # the finished items; where the next begins
        j = at
        while True:
            self.steps += 1
            j = skip_ws(s, j)
            if j >= len(s) or s[j] == "]":
                break
            if s[j] == ",":
                j += 1
                continue
            end = self.value_end(j)
            if end is None:
                self.arrays[i] = (starts, at)
                return [*starts, j]
            starts.append(j)
            at = j = end
        self.arrays[i] = (starts, at)
        return list(starts)

    def object_end(self, i: int) -> int | None:
        """The index after the object that begins at s[i] (after blanks), None while unfinished or not one."""
        return self.object_fields(i)[1]

    def call_span(self, i: int, args_keys: tuple[str, ...]) -> CallSpan | None:
        """The call object that begins at s[i]: {"name": N, <args key>: {...}} in either order."""
        if (sp := self.calls.get((i, args_keys))) is not None:
            return sp
        s = self.s
        fields, end = self.object_fields(i)
        name = None
        if "name" in fields and fields["name"][1] is not None:
            try:
                v = json.loads(s[fields["name"][0]:fields["name"][1]])
            except ValueError:  # not a JSON value (a raw control character, a bare word)
                v = None
            name = v if isinstance(v, str) else None
        key = next((k for k in args_keys if k in fields), None)
        if key is None:
            return CallSpan(name, "", False) if name is not None else None
        a, b = fields[key]
        sp = CallSpan(name, s[a:b] if b is not None else s[a:], b is not None)
        if end is not None:  # the whole object is written: nothing in it changes any more
            self.calls[(i, args_keys)] = sp
        return sp


def as_scan(text: str | Scan) -> Scan:
    """A streamed answer's own Scan, or a fresh one over a whole text."""
    return text if isinstance(text, Scan) else Scan(text)


def string_end(s: str, i: int) -> int | None:
    return Scan(s).string_end(i)


def value_end(s: str, i: int) -> int | None:
    return Scan(s).value_end(i)


def call_span(s: str | Scan, i: int, args_keys: tuple[str, ...]) -> CallSpan | None:
    return as_scan(s).call_span(i, args_keys)


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
        self.settled = 0  # the leading calls whose whole arguments went out: never looked at again

    @property
    def started(self) -> bool:
        return bool(self.ids)

    def update(self, spans: list[CallSpan]) -> list[dict]:
        deltas = []
        for k in range(self.settled, len(spans)):
            c = spans[k]
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
            if k == self.settled and c.done:
                self.settled += 1
        return deltas

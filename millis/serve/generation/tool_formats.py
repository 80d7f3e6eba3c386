"""How tools reach a model and how its calls come back: one `ToolFormat` per chat-template family.

A chat template that takes `tools` was trained with a call syntax of its own. millis renders the tools
through the template (its `tools` variable) and reads that syntax back, as vLLM's tool parsers do:

- hermes: templates that write `<tool_call>` (Qwen2.5, Hermes, SmolLM3, ...), one block per call:
      <tool_call>\n{"name": "get_weather", "arguments": {...}}\n</tool_call>
- llama3: Llama 3.1 / 3.2 / 3.3 templates ("Given the following functions"), one call per answer:
      {"name": "get_weather", "parameters": {...}}
- generic: every other template (SmolLM2's included): tools.py's JSON in a system message.

tool_choice required or a named function: the answer is constrained (millis.gen.grammar) to the
family's call syntax, each call's arguments to its tool's `parameters`, so calls always parse and
validate; the JSON is written as templates' tojson writes it (no free whitespace). auto: a native
family generates freely (a model trained on the syntax writes it when it means to call), and what
parses as calls of known tools becomes tool_calls, the rest content; the generic format stays
constrained to {"tool_calls": ...} | {"response": ...}. auto with a tool's `strict: true` (any one: then
every tool's calls are constrained, the simplest rule): a native family's text stays free, but every call it
starts is forced to be a valid call, as under required:
- hermes: text without `<tool_call>`, and `<tool_call>` blocks (one when parallel_tool_calls is false) with text
  around them. The text before a block is a lazy lexeme ending at the first `<tool_call>` (llguidance's `lazy`,
  docs/syntax.md "Tool calling"): a greedy "text without <tool_call>" lexeme followed by "<tool_call>" is not
  lexed (`<tool_cal` is still text, and the lexeme cannot end before the `<`), so no call could begin.
- llama3: one call (after whitespace and the text `<|python_tag|>`, optionally: the special token is not
  named, a grammar naming a token the tokenizer lacks does not compile), or text that does not open (after
  whitespace) with `{` or `<|python_tag|>`: what streamable() streams as content.
auto with response_format (ToolSpec.answer): calls, or the JSON response_format asks for as content, nothing
else (hermes: the JSON, never opening with `<`, or blocks; llama3: the JSON or a call, told apart by parse).
Such an answer streams and parses as an unconstrained auto one (streams_calls): its content goes out as it
comes, its calls are sent whole at the end. The grammars need `<tool_call>` to be text to llguidance: an added
token that is not special (Qwen2.5's `<tool_call>`) is made text by grammar.Grammars (docs/generation.md, Tools).
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

from millis.gen.chat_template import REASONING_FIELDS
from millis.gen.grammar import COMPACT_JSON, json_rule, json_schema_grammar, lark_grammar
from millis.serve.generation.conversation import ALL_ROLES, Roles, fit_roles
from millis.serve.generation.tool_stream import CallSpan, Scan, as_scan, call_span, tool_call
from millis.serve.generation.tools import (ToolSpec, arguments_of, embedded, is_json, parse_answer, strict_json,
                                          with_system, with_tools)

Calls = tuple[str | None, list[dict]]  # (content, OpenAI tool_call objects; arguments: the model's own text)


def string_prefix(raw: str) -> tuple[str, int]:
    """(text, n): the text of `raw[:n]`, the longest prefix of a JSON string's body written so far that
    decodes whole: no unfinished escape at its end, and no half of a surrogate pair."""
    for cut in range(len(raw), max(len(raw) - 12, -1), -1):  # an unfinished escape: at most \uXXXX\uXX
        try:
            text = json.loads(f'"{raw[:cut]}"')
        except ValueError:
            continue
        if text and 0xD800 <= ord(text[-1]) <= 0xDBFF:  # half a pair: it waits for its other half
            return text[:-1], cut - 6 if raw[cut - 6:cut - 4] == "\\u" else cut - 1
        return text, cut
    return "", 0


def string_so_far(scan: Scan, start: int, end: int) -> str:
    """The text of the JSON string body scan.s[start:end] written so far; a streamed answer's Scan keeps what
    it decoded, so each token decodes only the characters after it."""
    cut, text = scan.memo.get(f"string@{start}", (start, ""))
    more, n = string_prefix(scan.s[cut:end])
    scan.memo[f"string@{start}"] = (cut + n, text + more)
    return text + more


class GenericFormat:
    """tools.py's one JSON format, for templates without a tool syntax of their own."""

    name = "generic"
    args_keys = ("arguments",)

    def __init__(self, roles: Roles = ALL_ROLES):
        self.roles = roles  # the roles the template shows (conversation.probe_roles)

    def conversation(self, messages: list[dict], spec: ToolSpec | None) -> tuple[list[dict], list[dict] | None]:
        """(the messages as the template takes them, its `tools` variable)."""
        return fit_roles(with_tools(messages, spec), self.roles), None

    def grammar(self, spec: ToolSpec) -> str | None:
        return json_schema_grammar(spec.schema())

    def streams_calls(self, spec: ToolSpec) -> bool:
        """Whether the answer's grammar makes all of it this format's syntax, so that its calls stream as they are
        written (tool_stream.py) and content_so_far reads it as such: always for the generic format."""
        return True

    def cut(self, text: str, spec: ToolSpec) -> bool:
        """Whether the answer ended inside a call its text began, beside its parsed ones (hermes, auto): then its
        finish_reason stays the engine's, never "tool_calls" (the generic format's cut calls do not parse whole)."""
        return False

    def parse(self, text: str, spec: ToolSpec) -> Calls:
        content, calls = parse_answer(text)
        spans = self.spans(text)
        named = [sp for sp in spans if sp.name is not None]
        if not calls and named:  # cut by max_tokens among its calls: the calls as far as written, as streamed (the
            return None, [tool_call(sp.name, sp.args) for sp in named]  # wire JSON was the content)
        if not calls and (content is text or spec.answer is not None):  # a cut answer: its response as far as
            return self.content_so_far(text, True, spec.answer is not None) or None, []  # written, as streamed
        if len(spans) == len(calls):  # the arguments as the model wrote them (what streaming sends)
            for c, sp in zip(calls, spans):
                c["function"]["arguments"] = sp.args
        return content, calls

    def spans(self, text: str | Scan) -> list[CallSpan]:
        """The calls of an answer written so far: {"tool_calls": [call, ...]}."""
        scan = as_scan(text)
        fields, _ = scan.object_fields(0)
        if "tool_calls" not in fields:
            return []
        items = scan.array_items(fields["tool_calls"][0])
        whole, looked = scan.memo.get("generic", ([], 0))  # the whole calls, of the first `looked` items
        tail = []
        for k in range(looked, len(items)):
            sp = scan.call_span(items[k], self.args_keys)
            if scan.object_end(items[k]) is None:  # only the last item can be unfinished
                tail += [sp] if sp is not None else []
                break
            whole += [sp] if sp is not None else []
            looked = k + 1
        scan.memo["generic"] = (whole, looked)
        return whole + tail

    def content_so_far(self, text: str | Scan, constrained: bool, raw: bool = False) -> str:
        """The content a choice's text so far shows for sure: a {"response": ...} answer's string as written; `raw`
        (response_format beside tools): its JSON value's text as written."""
        scan = as_scan(text)
        fields, _ = scan.object_fields(0)
        if "response" not in fields:
            return ""
        a, b = fields["response"]
        if raw:
            return scan.s[a:b]  # b None: the value is being written, and all the text after its start is its own
        if scan.s[a] != '"':
            return ""
        return string_so_far(scan, a + 1, b - 1 if b is not None else len(scan.s))


class NativeFormat(GenericFormat):
    """A template's own syntax: the tools and earlier calls go to the template as OpenAI objects (arguments
    as objects, as transformers' templates expect); subclasses say how calls are written."""

    args_key = "arguments"
    args_keys = ("arguments", "parameters")  # where a call's arguments are read, first found (call_of's order)

    def conversation(self, messages: list[dict], spec: ToolSpec | None) -> tuple[list[dict], list[dict] | None]:
        out = []
        for m in messages:
            m = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name",
                                                     *REASONING_FIELDS)}
            if m["role"] == "assistant" and m.get("tool_calls"):
                m["tool_calls"] = [{"id": c.get("id") or "", "type": "function", "function": {
                    "name": c["function"]["name"], "arguments": arguments_of(c)}}
                    for c in m["tool_calls"]]  # their shape checked by the request's parser
                m["content"] = m.get("content") or ""
            out.append(m)
        tools = None if spec is None else [{"type": "function", "function": t} for t in spec.tools]
        answer = spec.answer_text() if spec is not None else ""
        out = with_system(out, answer) if answer else out
        return fit_roles(out, replace(self.roles, tool=True)), tools  # its own tool turns; system, developer fitted

    def call_schema(self, spec: ToolSpec) -> dict:
        """One call: {"name": N, <args_key>: <N's parameters>} for a tool N of the spec."""
        return {"anyOf": [{"type": "object",
                           "properties": {"name": {"const": t["name"]}, self.args_key: embedded(t)},
                           "required": ["name", self.args_key], "additionalProperties": False} for t in spec.tools]}

    def streams_calls(self, spec: ToolSpec) -> bool:
        """required or a named function: the answer is calls; auto, strict too, holds free text (parsed at the end)."""
        return spec.required

    def required_calls(self, text: str, spec: ToolSpec) -> Calls:
        """An answer constrained to calls (tool_choice required, a named function): the calls as far as written,
        the last one cut by max_tokens included, as streaming sent them; never the call syntax as content (a cut
        answer came back as `<tool_call>...` text with no calls, where the stream had sent one)."""
        calls = [tool_call(sp.name, sp.args) for sp in self.spans(text) if sp.name is not None]
        return None, calls if spec.parallel else calls[:1]

    def call_of(self, body: str, spec: ToolSpec) -> dict | None:
        """The tool_call a call's JSON text stands for (its arguments as written), or None when it does not
        parse or is not a call of a known tool."""
        try:
            value = strict_json(body)
        except ValueError:
            return None
        names = {t["name"] for t in spec.tools}
        if not isinstance(value, dict) or value.get("name") not in names:
            return None
        args = value.get(self.args_key, value.get("arguments", value.get("parameters")))
        if not isinstance(args, dict):
            return None
        sp = call_span(body, 0, self.args_keys)
        return tool_call(value["name"], sp.args if sp is not None and sp.done else args)

    def streamable(self, text: str, constrained: bool) -> int:
        """How much of a choice's text so far can be streamed as it is (a subclass's syntax says; none here)."""
        return 0

    def content_so_far(self, text: str | Scan, constrained: bool, raw: bool = False) -> str:
        s = as_scan(text).s
        return s[:self.streamable(s, constrained)]


def named(body: str) -> bool:
    """A whole JSON object that could be a call (it has a name): `<tool_call>{"a": 1}` in prose is text."""
    try:
        value = strict_json(body)
    except ValueError:
        return False
    return isinstance(value, dict) and "name" in value


class HermesFormat(NativeFormat):
    name = "hermes"
    MARK = "<tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    CLOSE = re.compile(r"\s*</tool_call>")

    def grammar(self, spec: ToolSpec) -> str | None:
        body = f"body: {json_rule(self.call_schema(spec), COMPACT_JSON)}"
        blocks = 'call ("\\n" call)*' if spec.parallel else "call"
        if spec.required:
            return lark_grammar(f'start: {blocks}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n{body}')
        if spec.answer is not None:  # auto with response_format: its JSON (which never opens with `<`), or calls
            return lark_grammar(f'start: answer | {blocks}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n{body}\n'
                                f"answer: {json_rule(spec.answer)}")
        if not spec.strict:
            return None
        # auto, strict: `mark` is the text before a block and its `<tool_call>` (lazy: it ends at the first one)
        calls = "(mark call)* TEXT?" if spec.parallel else "TEXT? | mark call TEXT?"
        return lark_grammar(f'start: {calls}\nmark[lazy]: /(?s:.*)<tool_call>/\ncall: "\\n" body "\\n</tool_call>"\n'
                            f"TEXT: /(?s:.+)/ & ~/(?s:.*)<tool_call>(?s:.*)/\n{body}")

    def streamable(self, text: str, constrained: bool) -> int:
        """auto: the text before a `<tool_call>` (or before a tail that may begin one) is content."""
        if constrained:
            return 0
        at = text.find(self.MARK)
        if at >= 0:
            return at
        tail = next((k for k in range(min(len(self.MARK) - 1, len(text)), 0, -1) if text.endswith(self.MARK[:k])), 0)
        return len(text) - tail

    def spans(self, text: str | Scan) -> list[CallSpan]:
        """The `<tool_call>` blocks written so far."""
        scan = as_scan(text)
        whole, at = scan.memo.get("hermes", ([], 0))  # the whole calls so far; where the next block may begin
        tail = []
        while (mark := scan.s.find(self.MARK, at)) >= 0:
            start = mark + len(self.MARK)
            sp, end = scan.call_span(start, self.args_keys), scan.object_end(start)
            if end is None:  # the call is being written (a mark inside its strings is not a block)
                tail += [sp] if sp is not None else []
                break
            whole += [sp] if sp is not None else []
            at = end
        scan.memo["hermes"] = (whole, at)
        return whole + tail

    def content_so_far(self, text: str | Scan, constrained: bool, raw: bool = False) -> str:
        """auto: the text before a `<tool_call>`, less its trailing whitespace (parse drops it before a call)."""
        return super().content_so_far(text, constrained).rstrip()

    def parse(self, text: str, spec: ToolSpec) -> Calls:
        """auto: the calls of the `<tool_call>` blocks; content the text around them, as streamed: the text before
        the first `<tool_call>` as it is (without leading whitespace when that is all it is), then what follows the
        blocks, trailing whitespace off. A call the answer ended inside (cut_at: a stop string, max_tokens) is call
        syntax, not text: not in content, and no call."""
        if spec.required:
            return self.required_calls(text, spec)
        if spec.answer is not None:  # the grammar's two forms: calls (a cut mark: none), or response_format's JSON
            return self.required_calls(text, spec) if text.startswith(self.MARK) or self.MARK.startswith(text) \
                else (text, [])
        cut = self.cut_at(text)
        body = text if cut is None else text[:cut]
        blocks = self.blocks(body)
        calls = [c for c in (self.call_of(b, spec) for _, _, b in blocks) if c is not None]
        if not calls:
            return (text, []) if cut is None else (body.rstrip() or None, [])
        rest, at = [], 0
        for start, end, _ in blocks:
            rest.append(body[at:start])
            at = end
        rest = ("".join(rest) + body[at:]).rstrip()
        if not text[:text.find(self.MARK)].strip():  # nothing went out before the first call: no leading blank
            rest = rest.lstrip()
        return rest or None, calls if spec.parallel else calls[:1]

    def cut(self, text: str, spec: ToolSpec) -> bool:
        return not spec.required and spec.answer is None and self.cut_at(text) is not None

    def cut_at(self, text: str) -> int | None:
        """Where a call the answer ended inside begins (its `<tool_call>`, after the last whole block): nothing, or an
        unfinished JSON object, or a whole one and part of its `\n</tool_call>`, follows it. None if none does
        (`<tool_call>` in prose stays text)."""
        blocks = self.blocks(text)
        scan, at = Scan(text), blocks[-1][1] if blocks else 0
        while (mark := text.find(self.MARK, at)) >= 0:
            start = mark + len(self.MARK)
            rest = text[start:].lstrip()
            if not rest:
                return mark
            if rest[0] == "{":
                end = scan.object_end(start)
                if end is None or "</tool_call>".startswith(text[end:].lstrip()) and named(text[start:end]):
                    return mark
            at = start
        return None

    def blocks(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, body) of each `<tool_call>` block. A body that is a JSON object is read by the scanner, so
        a `</tool_call>` inside one of its strings does not end the block (the regex's first match lost the call);
        any other body runs to the next `</tool_call>`."""
        scan, out, at = Scan(text), [], 0
        while (mark := text.find(self.MARK, at)) >= 0:
            start = mark + len(self.MARK)
            end = scan.object_end(start)
            close = self.CLOSE.match(text, end) if end is not None else None
            m = close or self.BLOCK.match(text, mark)
            if m is None or not close and self.MARK in m.group(1):  # a mark in prose: a later one may open a call
                at = start
                continue
            body = text[start:end] if close else m.group(1)
            out.append((mark, m.end(), body.strip()))
            at = m.end()
        return out


class Llama3Format(NativeFormat):
    name = "llama3"
    args_key = "parameters"
    args_keys = ("parameters", "arguments")
    TAG = "<|python_tag|>"
    # what may come before a call: blanks as JSON's, bounded as grammar.JSON_OPTIONS bounds them (llguidance's \s is
    # any Unicode blank, unbounded: a greedy model spent max_tokens there)
    LEAD = r"LEAD: /[ \t\n\r]{1,12}/ | /[ \t\n\r]{0,12}<\|python_tag\|>[ \t\n\r]{0,12}/" "\n"

    def spans(self, text: str | Scan) -> list[CallSpan]:
        """The one call, as far as it is written."""
        scan = as_scan(text)
        at = len(scan.s) - len(scan.s.lstrip())
        sp = scan.call_span(at + len(self.TAG) if scan.s.startswith(self.TAG, at) else at, self.args_keys)
        return [sp] if sp is not None else []

    def grammar(self, spec: ToolSpec) -> str | None:
        if spec.required:
            return json_schema_grammar(self.call_schema(spec), COMPACT_JSON)
        if spec.answer is not None:  # auto with response_format: a call, or its JSON (parse tells them apart)
            return lark_grammar(f"start: answer | LEAD? body\nanswer: {json_rule(spec.answer)}\n" + self.LEAD +
                                f"body: {json_rule(self.call_schema(spec), COMPACT_JSON)}")
        if not spec.strict:
            return None
        return lark_grammar(r"start: TEXT? | LEAD? body" "\n" + self.LEAD +  # auto, strict: text, or one call
                            r"TEXT: /(?s:.+)/ & ~/(?s:\s*\{.*)/ & ~/(?s:\s*<\|python_tag\|>.*)/" "\n"
                            f"body: {json_rule(self.call_schema(spec), COMPACT_JSON)}")

    def streamable(self, text: str, constrained: bool) -> int:
        """auto: an answer that cannot be a call (it does not open with `{` or <|python_tag|>) is content."""
        s = text.lstrip()
        if constrained or not s or s.startswith(("{", self.TAG)) or self.TAG.startswith(s):
            return 0
        return len(text)

    def parse(self, text: str, spec: ToolSpec) -> Calls:
        if spec.required:
            return self.required_calls(text, spec)
        body = text.strip().removeprefix(self.TAG).strip()
        call = self.call_of(body, spec)
        if call is None and spec.answer is not None and not is_json(body):  # a call cut by max_tokens, as far as
            names = {t["name"] for t in spec.tools}                              # written (hermes's too), or JSON cut
            cut = [tool_call(sp.name, sp.args) for sp in self.spans(text) if sp.name in names]
            return (None, cut) if cut or self.TAG.startswith(text.strip()) else (text, [])
        return (None, [call]) if call is not None else (text, [])


GENERIC, HERMES, LLAMA3 = GenericFormat(), HermesFormat(), Llama3Format()


def tool_format(template: str | None, roles: Roles = ALL_ROLES) -> GenericFormat:
    """The tool format a chat template was trained with (generic when it shows none, fitted to the roles it
    shows)."""
    if template and "<tool_call>" in template:
        return HERMES if roles == ALL_ROLES else HermesFormat(roles)
    if template and "Given the following functions" in template:
        return LLAMA3 if roles == ALL_ROLES else Llama3Format(roles)
    return GENERIC if roles == ALL_ROLES else GenericFormat(roles)

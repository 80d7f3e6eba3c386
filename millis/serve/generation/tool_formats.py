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
constrained to {"tool_calls": ...} | {"response": ...}.
"""
from __future__ import annotations

import json
import re
import uuid

from millis.gen.grammar import COMPACT_JSON, json_rule, json_schema_grammar, lark_grammar
from millis.serve.generation.tools import ToolSpec, arguments_of, parse_answer, with_tools

Calls = tuple[str | None, list[dict]]  # (content, OpenAI tool_call objects)


def tool_call(name: str, args) -> dict:
    """An OpenAI tool_call object; arguments as a JSON string."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


class GenericFormat:
    """tools.py's one JSON format, for templates without a tool syntax of their own."""

    name = "generic"

    def conversation(self, messages: list[dict], spec: ToolSpec | None) -> tuple[list[dict], list[dict] | None]:
        """(the messages as the template takes them, its `tools` variable)."""
        return with_tools(messages, spec), None

    def grammar(self, spec: ToolSpec) -> str | None:
        return json_schema_grammar(spec.schema())

    def parse(self, text: str, spec: ToolSpec) -> Calls:
        return parse_answer(text)

    def streamable(self, text: str, constrained: bool) -> int:
        """How much of a choice's text so far can be streamed as content: none of a JSON answer."""
        return 0


class NativeFormat(GenericFormat):
    """A template's own syntax: the tools and earlier calls go to the template as OpenAI objects (arguments
    as objects, as transformers' templates expect); subclasses say how calls are written."""

    args_key = "arguments"

    def conversation(self, messages: list[dict], spec: ToolSpec | None) -> tuple[list[dict], list[dict] | None]:
        out = []
        for m in messages:
            m = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
            if m["role"] == "assistant" and m.get("tool_calls"):
                m["tool_calls"] = [{"id": c.get("id", ""), "type": "function", "function": {
                    "name": c.get("function", {}).get("name"), "arguments": arguments_of(c)}}
                    for c in m["tool_calls"] if isinstance(c, dict)]
                m["content"] = m.get("content") or ""
            out.append(m)
        tools = None if spec is None else [{"type": "function", "function": t} for t in spec.tools]
        return out, tools

    def call_schema(self, spec: ToolSpec) -> dict:
        """One call: {"name": N, <args_key>: <N's parameters>} for a tool N of the spec."""
        return {"anyOf": [{"type": "object",
                           "properties": {"name": {"const": t["name"]}, self.args_key: t["parameters"]},
                           "required": ["name", self.args_key], "additionalProperties": False} for t in spec.tools]}

    def call_of(self, value, spec: ToolSpec) -> dict | None:
        """The tool_call a parsed JSON value stands for, or None when it is not a call of a known tool."""
        names = {t["name"] for t in spec.tools}
        if not isinstance(value, dict) or value.get("name") not in names:
            return None
        args = value.get(self.args_key, value.get("arguments", value.get("parameters")))
        return tool_call(value["name"], args) if isinstance(args, dict) else None


class HermesFormat(NativeFormat):
    name = "hermes"
    MARK = "<tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def grammar(self, spec: ToolSpec) -> str | None:
        if not spec.required:
            return None
        calls = 'call ("\\n" call)*' if spec.parallel else "call"
        return lark_grammar(f'start: {calls}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n'
                            f"body: {json_rule(self.call_schema(spec), COMPACT_JSON)}")

    def streamable(self, text: str, constrained: bool) -> int:
        """auto: the text before a `<tool_call>` (or before a tail that may begin one) is content."""
        if constrained:
            return 0
        at = text.find(self.MARK)
        if at >= 0:
            return at
        tail = next((k for k in range(min(len(self.MARK) - 1, len(text)), 0, -1) if text.endswith(self.MARK[:k])), 0)
        return len(text) - tail

    def parse(self, text: str, spec: ToolSpec) -> Calls:
        calls = []
        for block in self.BLOCK.findall(text):
            try:
                call = self.call_of(json.loads(block), spec)
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
        if not calls:
            return text, []
        rest = self.BLOCK.sub("", text).strip()
        return rest or None, calls if spec.parallel else calls[:1]


class Llama3Format(NativeFormat):
    name = "llama3"
    args_key = "parameters"
    TAG = "<|python_tag|>"

    def grammar(self, spec: ToolSpec) -> str | None:
        return json_schema_grammar(self.call_schema(spec), COMPACT_JSON) if spec.required else None

    def streamable(self, text: str, constrained: bool) -> int:
        """auto: an answer that cannot be a call (it does not open with `{` or <|python_tag|>) is content."""
        s = text.lstrip()
        if constrained or not s or s.startswith(("{", self.TAG)) or self.TAG.startswith(s):
            return 0
        return len(text)

    def parse(self, text: str, spec: ToolSpec) -> Calls:
        body = text.strip().removeprefix(self.TAG).strip()
        try:
            call = self.call_of(json.loads(body), spec)
        except ValueError:
            call = None
        return (None, [call]) if call is not None else (text, [])


GENERIC, HERMES, LLAMA3 = GenericFormat(), HermesFormat(), Llama3Format()


def tool_format(template: str | None) -> GenericFormat:
    """The tool format a chat template was trained with (generic when it shows none)."""
    if template and "<tool_call>" in template:
        return HERMES
    if template and "Given the following functions" in template:
        return LLAMA3
    return GENERIC

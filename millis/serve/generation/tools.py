"""Tool calls (`tools` / `tool_choice` on /v1/chat/completions): the request's checks, and the generic
format, for templates without a tool syntax of their own (tool_formats.py has the native ones).

Most small models' templates (SmolLM2's too) show no tools, so millis does what llama.cpp's server
does for templates it does not know: the tools are described in a system message, and the answer
is constrained (millis.gen.grammar) to one JSON value the server parses, never free text it guesses at:

    {"tool_calls": [{"name": "get_weather", "arguments": {...}}, ...]}   -> message.tool_calls
    {"response": "plain answer"}                                          -> message.content (auto only)
    {"response": <JSON following response_format's schema>}              -> message.content: the JSON as written

tool_choice "none" sends the tools to nobody (plain chat); "auto" allows either form; "required" or
{"type": "function", "function": {"name": N}} allows calls only (of N only). Each tool's `parameters`
schema constrains its arguments, so arguments always parse and validate (a tool's `strict` changes nothing here;
tool_formats.py reads it for native formats under auto). parallel_tool_calls false
allows one call. Earlier turns are shown to the model in the same JSON: an assistant message's
tool_calls as its content, a tool message's result as a "tool" turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from millis.gen.chat_template import REASONING_FIELDS
from millis.serve.generation.tool_stream import tool_call
from millis.serve.schemas import MAX_JSON_DEPTH, ApiError, json_shape

MAX_TOOLS = 64
TOOL_KEYS = ("role", "content", "tool_call_id", "name")  # of a tool result, as templates read it
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")  # OpenAI's


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[dict, ...]   # {"name", "description", "parameters"} of the tools the model may call
    required: bool            # the answer must be calls (tool_choice required or a named function)
    parallel: bool            # more than one call in an answer
    strict: bool = False      # a tool says `strict: true`: under auto, a native format's calls are constrained too
    answer: dict | None = None  # response_format's JSON schema: content (under auto) is JSON following it

    def schema(self) -> dict:
        """The JSON schema every answer satisfies."""
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": embedded(t)},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]}
        calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                                                 **({} if self.parallel else {"maxItems": 1})}},
                 "required": ["tool_calls"], "additionalProperties": False}
        if self.required:
            return calls
        # response_format's schema under an $id of its own, as a tool's parameters (embedded): its "#/$defs/..." refs
        # resolve in it, not at the envelope's root
        text = {"type": "string"} if self.answer is None else {"$id": "urn:millis:response", **self.answer}
        answer = {"type": "object", "properties": {"response": text}, "required": ["response"],
                  "additionalProperties": False}
        return {"anyOf": [calls, answer]}

    def system_text(self) -> str:
        listing = "\n".join(json.dumps({"name": t["name"], "description": t["description"],
                                        "parameters": t["parameters"]}) for t in self.tools)
        how = ('Answer with JSON only: {"tool_calls": [{"name": <tool name>, "arguments": {...}}]} to call '
               'tools' + ('' if self.required else ', or {"response": <your answer>} to answer directly') + '.')
        answer = self.answer_text()
        return f"You can call these tools:\n{listing}\n{how}" + (f"\n{answer}" if answer else "")

    def answer_text(self) -> str:
        """What tells the model response_format's schema (every format's prompt shows it; the grammar holds to it)."""
        if self.answer is None or self.required:
            return ""
        return f"An answer that calls no tool is JSON following this schema: {json.dumps(self.answer)}"


def embedded(tool: dict) -> dict:
    """A tool's `parameters` as a schema nested in the answer's: with an `$id` of its own, so that its `$ref`s
    ("#/$defs/City", as Pydantic writes them) still resolve against it and not against the answer's root."""
    params = tool["parameters"]
    if not isinstance(params, dict) or "$id" in params:
        return params
    return {"$id": f"urn:millis:tool:{tool['name']}", **params}


def _fail(msg: str, param: str = "tools") -> ApiError:
    return ApiError(422, msg, param=param, code="invalid_value")


def tool_spec(body: dict) -> ToolSpec | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _fail("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise _fail("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _fail(f"tools must be a list of at most {MAX_TOOLS} function tools")
    specs, strict = [], False
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"] or \
                not set(f["name"]) <= NAME_CHARS or len(f["name"]) > 64:
            raise _fail(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a name "
                        f"of 1..64 letters, digits, _ or - (OpenAI's ^[a-zA-Z0-9_-]{{1,64}}$)")
        # none: no arguments, as OpenAI reads it (an open object let the model invent keys)
        params = f.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        if not isinstance(params, dict) or not isinstance(f.get("description", ""), str):
            raise _fail(f"tools[{i}].function.parameters must be a JSON schema object and description a string")
        if params.get("type", "object") != "object":  # arguments are keyword arguments: always an object
            raise _fail(f"tools[{i}].function.parameters must describe an object (type \"object\"), got type "
                        f"{params.get('type')!r}")
        params = {"type": "object", **params}  # {} or a schema without a type: arguments are still an object
        if json_shape(params)[0] > MAX_JSON_DEPTH:
            raise _fail(f"tools[{i}].function.parameters nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(f.get("strict", False), (bool, type(None))):  # OpenAI's boolean (null: absent)
            raise _fail(f"tools[{i}].function.strict must be true or false, got {f['strict']!r}")
        strict = strict or f.get("strict") is True  # kept out of the tool: templates that dump it would show it
        specs.append({"name": f["name"], "description": f.get("description", ""), "parameters": params})
    if len({s["name"] for s in specs}) != len(specs):
        raise _fail("tools must have distinct names")
    parallel = parallel is not False
    if choice in (None, "auto"):
        return ToolSpec(tuple(specs), False, parallel, strict)
    if choice == "none":
        return None
    if choice == "required":
        return ToolSpec(tuple(specs), True, parallel, strict)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    named = [s for s in specs if s["name"] == name]
    if not named:
        raise _fail(f"tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": "
                    f"N}}}} with N one of the tools, got {choice!r}", "tool_choice")
    return ToolSpec(tuple(named), True, False, strict)  # a named function: called once (vLLM's; sampling gave up to 4)


def with_tools(messages: list[dict], spec: ToolSpec | None) -> list[dict]:
    """The conversation as the model sees it: the tools in the system message (when any may be called),
    earlier assistant tool calls as their JSON, tool results as "tool" turns."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            shown = [{"name": c["function"]["name"], "arguments": arguments_of(c)} for c in calls]  # checked
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": shown})})
        elif m["role"] == "tool":  # the call it answers: templates check it (Mistral's) or show it
            out.append({k: v for k, v in {**m, "content": m.get("content") or ""}.items() if k in TOOL_KEYS})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", *REASONING_FIELDS)})
    return out if spec is None else with_system(out, spec.system_text())


def with_system(messages: list[dict], text: str) -> list[dict]:
    """`text` at the end of the conversation's system (or developer) message, in a new one first where it has none."""
    if messages and messages[0]["role"] in ("system", "developer"):
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def strict_json(text: str) -> Any:
    """json.loads refusing NaN and Infinity (ValueError): Python reads them, JSON has no such values, so arguments
    holding them parse in no client (JSON.parse, strict parsers)."""
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def is_json(text: str) -> bool:
    """Whether `text` is one whole JSON value (strict_json's: no NaN or Infinity)."""
    try:
        strict_json(text)
    except ValueError:
        return False
    return True


def arguments_of(call: dict) -> Any:
    """An OpenAI tool_call's arguments as a value (the JSON string parsed; left as it is when it does not parse;
    absent or null: {})."""
    args = call["function"].get("arguments")
    args = "{}" if args is None else args
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return args


def parse_answer(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a constrained answer: OpenAI tool_call objects, arguments as a JSON string.
    Text that is not a complete answer (cut by max_tokens) is returned as content."""
    try:
        v = json.loads(text)
    except ValueError:
        return text, []
    if isinstance(v, dict) and isinstance(v.get("tool_calls"), list):
        return None, [tool_call(c["name"], c["arguments"]) for c in v["tool_calls"]]
    if isinstance(v, dict) and isinstance(v.get("response"), str):
        return v["response"], []
    return text, []

"""What a chat template is given: the roles it shows (probed once), the generic conversation fitted to them, and a
request's own template variables (chat_template_kwargs).

A template written for plain chat may drop a tool result's turn without a word (Phi-3's, TinyLlama's: the model
never sees the result) or refuse a system message (Gemma's raise_exception). As llama.cpp's server does for such
templates (minja's polyfills), the generic format then shows a tool result as a user turn holding
{"tool_response": {"tool", "content", "tool_call_id"}}, and a system message's text at the head of the first user
turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from millis.gen.chat_template import SPECIAL_TOKENS, render_chat
from millis.serve.schemas import MAX_JSON_DEPTH, ApiError, boolean, json_shape


@dataclass(frozen=True)
class Roles:
    """Which roles' text a template shows."""

    system: bool = True
    tool: bool = True
    developer: bool = True  # else a developer message is shown as the system message (Qwen2.5's drops the role)


ALL_ROLES = Roles()
PROBE_ID = "call00001"  # 9 letters and digits: Mistral's templates refuse other tool call ids


def probe_roles(template: str, special: dict[str, str]) -> Roles:
    """Render two small conversations: does a system message's text, a tool result's text, appear? (A template
    that raises on the role shows it no more than one that skips it.)"""
    def shows(messages: list[dict], mark: str) -> bool:
        try:
            return mark in render_chat(template, messages, special)
        except Exception:  # noqa: BLE001 -- raise_exception("System role not supported"), a TypeError, ...
            return False

    system = shows([{"role": "system", "content": "millis-probe-system"}, {"role": "user", "content": "hi"}],
                   "millis-probe-system")
    tool = shows([{"role": "user", "content": "hi"}, {"role": "assistant", "content": '{"tool_calls": []}'},
                  {"role": "tool", "content": "millis-probe-tool", "tool_call_id": PROBE_ID, "name": "f"}],
                 "millis-probe-tool")
    developer = shows([{"role": "developer", "content": "millis-probe-developer"}, {"role": "user", "content": "hi"}],
                      "millis-probe-developer")
    return Roles(system, tool, developer)


def fit_roles(messages: list[dict], roles: Roles) -> list[dict]:
    """The generic conversation with tool results as user turns where the template shows no tool role
    (consecutive results in one turn: templates that want user and assistant to alternate), a developer message as
    the system message where it shows no developer role, and system text in the first user turn where it shows no
    system role."""
    out: list[dict] = []
    joined = False  # the last turn of `out` holds tool results: the next one joins it
    for m in messages:
        if m["role"] == "developer" and not roles.developer and (roles.system or not out):  # (a later one where
            m = {**m, "role": "system"}                              # system is refused: a system turn would raise)
        if m["role"] == "tool" and not roles.tool:
            shown = json.dumps({"tool_response": {"tool": m.get("name", ""), "content": m.get("content") or "",
                                                  "tool_call_id": m.get("tool_call_id", "")}}, ensure_ascii=False)
            if joined:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + shown}
            else:
                out.append({"role": "user", "content": shown})
            joined = True
        else:
            out.append(m)
            joined = False
    if roles.system or not out or out[0]["role"] not in ("system", "developer"):
        return out
    system, rest = out[0].get("content") or "", out[1:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0].get('content') or ''}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


# the variables the server gives every template: a request's chat_template_kwargs cannot set them
SERVER_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", *SPECIAL_TOKENS})


def template_variables(body: dict) -> dict:
    """chat_template_kwargs (vLLM's and llama.cpp's field): more variables for the chat template, such as Qwen3's
    enable_thinking; JSON values, named as identifiers, none of the server's own."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(k.isidentifier() and not k.startswith("_") for k in kw):
        raise ApiError(422, "chat_template_kwargs must be an object whose keys are template variable names",
                       param="chat_template_kwargs", code="invalid_value")
    if taken := sorted(SERVER_VARIABLES & set(kw)):
        raise ApiError(422, f"chat_template_kwargs cannot set {', '.join(taken)}: the server sets them",
                       param="chat_template_kwargs", code="invalid_value")
    if json_shape(kw)[0] > MAX_JSON_DEPTH:
        raise ApiError(422, f"chat_template_kwargs nests deeper than {MAX_JSON_DEPTH} levels",
                       param="chat_template_kwargs", code="invalid_value")
    return kw


def prompt_end(body: dict, messages: list[dict]) -> str:
    """How the rendered prompt ends (vLLM's fields, transformers' arguments): "generation", the template's
    assistant header (add_generation_prompt, the default); "none", the last message as the template closes it; or
    "continue" (continue_final_message): cut right after the last message's text, an assistant answer the model
    goes on writing."""
    add, cont = boolean(body, "add_generation_prompt"), boolean(body, "continue_final_message", False)
    if cont and add:  # asked for both (add_generation_prompt absent: continue)
        raise ApiError(422, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message", code="invalid_value")
    if cont and (messages[-1]["role"] != "assistant" or not messages[-1].get("content")):
        raise ApiError(422, "continue_final_message needs the last message to be an assistant's, with content",
                       param="continue_final_message", code="invalid_value")
    return "continue" if cont else "none" if add is False else "generation"

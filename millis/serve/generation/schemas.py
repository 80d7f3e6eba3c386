"""OpenAI `/v1/completions` and `/v1/chat/completions`: request validation, response and SSE chunk bodies.

A request becomes a `GenRequest` (the prompt or the messages, `SamplingParams`, streaming options);
anything the engine cannot honour is a 4xx `ApiError` naming the field. Defaults are OpenAI's
(temperature 1, top_p 1, no penalties); `top_k`, `repetition_penalty` and `ignore_eos` are extensions.
"""
from __future__ import annotations


import json
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from millis.common.errors import MillisError
from millis.gen.config import (MAX_BIASED_TOKENS, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_OUTPUT_PENALTY, MAX_PENALTY,
                               MAX_TEMPERATURE, MIN_PENALTY, SEED_MAX, SEED_MIN, SamplingParams)
from millis.gen.grammar import json_schema_grammar
from millis.serve.generation.fields import check_fields
from millis.serve.generation.conversation import prompt_end, template_variables
from millis.serve.generation.tool_formats import GENERIC, GenericFormat
from millis.serve.generation.tools import ToolSpec, tool_spec
from millis.serve.schemas import (MAX_JSON_DEPTH, ApiError, boolean, check_model, integer, is_integral, json_shape,
                                  same_value)

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16
MAX_STOP_CHARS = 256          # per stop string: the engine's hold-back check costs O(len) per step
MAX_TOP_K = (1 << 31) - 1     # above the vocabulary = all tokens
MAX_N = 16                    # choices per request: each is a slot's work


@dataclass(frozen=True)
class GenLimits:
    """The per-request bounds that depend on the server: its default and largest max_tokens, the
    longest prompt text it tokenizes (longer: 413 before any tokenizing work), and the most choices
    (a request's choices must all start within the first-token timeout: at most the engine's slots)."""

    default_max_tokens: int
    max_tokens: int
    max_prompt_chars: int
    max_n: int = MAX_N
    vocab: int = 0  # token ids (logit_bias) are below it; 0: not known here (the engine still checks)


@dataclass(frozen=True)
class GenRequest:
    prompt: str | list[int] | None      # /v1/completions: text or token ids
    messages: list[dict] | None         # /v1/chat/completions: [{role, content: str}]
    params: SamplingParams
    stream: bool
    include_usage: bool                 # stream_options.include_usage: a last chunk with `usage`
    n: int = 1                          # choices: n engine requests sharing the prompt's cached KV
    tools: ToolSpec | None = None       # chat: the tools the answer may call (params.grammar constrains it)
    tool_format: GenericFormat = GENERIC  # chat: how the template shows tools and the model writes calls
    template_tools: list | None = None    # chat: the chat template's `tools` variable
    chars: int = 0                        # text characters the prompt is made of (chat: all the template shows)
    asked: str = ""                       # the field that set max_tokens; "": the server's default (cut at the context)
    template_vars: dict = field(default_factory=dict)  # chat: chat_template_kwargs, the template's own variables
    tool_use: bool = False                # chat: rendered through the model's tool_use template
    end: str = "generation"               # chat: how the prompt ends (conversation.prompt_end)

    def __post_init__(self) -> None:
        # a stop string would end the answer mid-value, as "stop"; not a native format's strict tools under auto
        # without response_format: free text with calls constrained where the model starts one, which a stop string
        # may end (a call it cuts is text, as one max_tokens cuts), as OpenAI and vLLM take stop with tools
        free = self.tools is not None and not self.tool_format.streams_calls(self.tools) and self.tools.answer is None
        if self.params.grammar and self.params.stop and not free:
            raise ApiError(422, f"stop cannot be combined with {self.grammar_from}: its grammar decides where the "
                                "answer ends, and a stop string would cut the JSON it promises", param="stop",
                           code="invalid_value")

    @property
    def grammar_from(self) -> str:
        """The field params.grammar came from (its 422s name it)."""
        return "tools" if self.tools is not None else "response_format" if self.params.grammar else ""


def _number(body: dict, key: str, default: float, lo: float, hi: float, open_lo: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with open_lo)."""
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if open_lo else lo <= v) and v <= hi
    if not ok:
        rule = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise ApiError(422, f"{key} must be a number in {rule}, got {v!r}", param=key, code="invalid_value")
    return float(v)


def _logprobs(body: dict, chat: bool) -> int:
    """-1 (off) or how many top alternatives per token. Chat: logprobs true/false and top_logprobs;
    completions: logprobs = the number of alternatives (OpenAI's legacy field)."""
    top = integer(body, "top_logprobs", 0, MAX_LOGPROBS, 0)  # checked on both routes, used by chat
    if not chat:
        v = -1 if body.get("logprobs") is False else integer(body, "logprobs", 0, MAX_LOGPROBS, -1)
        return -1 if v is None else v
    on = boolean(body, "logprobs", False)
    if top and not on:
        raise ApiError(422, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    return top if on else -1


def sampling(body: dict, limits: GenLimits, chat: bool = False) -> SamplingParams:
    """Every sampling field checked against both of its bounds here, at admission: nothing a request
    sends can make the engine's step raise (the step still isolates a request that does)."""
    check_fields(body)
    n = integer(body, "n", 1, MAX_N, 1)  # read by the request parsers; checked with the rest here
    if n > limits.max_n:
        raise ApiError(422, f"n is {n}; this server runs at most {limits.max_n} choices of a request at once "
                            f"(its --max-batch and --max-queue)", param="n", code="invalid_value")
    mt = integer(body, "max_tokens", 1, limits.max_tokens, limits.default_max_tokens)
    top_k = integer(body, "top_k", -1, MAX_TOP_K, 0)
    seed = integer(body, "seed", SEED_MIN, SEED_MAX)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(422, f"stop must be a string or a list of at most {MAX_STOPS} strings, each of 1.."
                            f"{MAX_STOP_CHARS} characters", param="stop", code="invalid_value")
    try:
        return SamplingParams(
            max_tokens=mt, temperature=_number(body, "temperature", 1.0, 0, MAX_TEMPERATURE),
            top_p=_number(body, "top_p", 1.0, 0, 1, open_lo=True),
            top_k=max(top_k, 0), seed=seed, stop=tuple(stops),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, MIN_PENALTY, MAX_PENALTY),
            presence_penalty=_number(body, "presence_penalty", 0.0, -MAX_OUTPUT_PENALTY, MAX_OUTPUT_PENALTY),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -MAX_OUTPUT_PENALTY, MAX_OUTPUT_PENALTY),
            logit_bias=logit_bias(body, limits.vocab),
            ignore_eos=boolean(body, "ignore_eos", False), logprobs=_logprobs(body, chat),
            grammar=response_format(body))
    except MillisError as e:
        raise ApiError(422, str(e), code="invalid_value") from None


def logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {token id as a string: bias in [-100, 100]} -> (id, bias) pairs, at most
    MAX_BIASED_TOKENS, ids distinct and in the vocabulary."""
    lb = body.get("logit_bias")
    if lb is None:
        return ()
    bad = lambda why: ApiError(422, f"logit_bias {why}", param="logit_bias", code="invalid_value")  # noqa: E731
    if not isinstance(lb, dict) or len(lb) > MAX_BIASED_TOKENS:
        raise bad(f"must be an object of at most {MAX_BIASED_TOKENS} token ids (strings) to numbers")
    out = {}
    for k, v in lb.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 10):
            raise bad(f"keys must be token ids (decimal strings), got {k!r}")
        t = int(k)
        if (vocab and t >= vocab) or t in out:
            raise bad(f"token id {k} is {'given twice' if t in out else f'not in 0..{vocab - 1}'}")
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_LOGIT_BIAS):
            raise bad(f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {v!r} for {k}")
        out[t] = float(v)
    return tuple(out.items())


def response_schema(body: dict) -> dict | None:
    """The JSON schema `response_format` holds the content to (json_object: any object); None for text."""
    rf = body.get("response_format")
    if rf is None or same_value(rf, {"type": "text"}):
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    schema = rf.get("json_schema") if isinstance(rf, dict) else None
    if kind == "json_schema" and not (isinstance(schema, dict) and isinstance(schema.get("name"), str)
                                      and isinstance(schema.get("schema"), dict)
                                      and isinstance(schema.get("strict", False), (bool, type(None)))):
        raise ApiError(422, "response_format json_schema needs json_schema: {name: str, schema: {...}, strict: bool}",
                       param="response_format", code="invalid_value")
    if kind in ("text", "json_object") and set(rf) != {"type"}:
        raise ApiError(422, f"response_format {kind} takes no other field", param="response_format",
                       code="invalid_value")
    if kind not in ("json_object", "json_schema"):
        raise ApiError(422, f"response_format must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                            f"{{\"type\": \"json_schema\", \"json_schema\": {{...}}}}, got {rf!r}",
                       param="response_format", code="invalid_value")
    if kind == "json_schema" and json_shape(schema["schema"])[0] > MAX_JSON_DEPTH:
        raise ApiError(422, f"response_format: the JSON schema nests deeper than {MAX_JSON_DEPTH} levels",
                       param="response_format", code="invalid_value")
    return schema["schema"] if kind == "json_schema" else {"type": "object"}


def response_format(body: dict) -> str:
    """The grammar of `response_format` ("" for text): json_object, or json_schema {name, schema, strict}."""
    schema = response_schema(body)
    if schema is None:
        return ""
    try:
        return json_schema_grammar(schema)
    except MillisError as e:
        raise ApiError(422, f"response_format: {e}", param="response_format", code="invalid_value") from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise ApiError(422, f"stream_options must be an object, got {opts!r}", param="stream_options",
                       code="invalid_type")
    return stream, boolean(opts, "include_usage", False)


def completion_request(body: dict, served: str, limits: GenLimits) -> GenRequest:
    """prompt: a string, or token ids; a list of one of those is one prompt (more: 422, n=1 only)."""
    check_model(body, served)
    if "prompt" not in body:
        raise ApiError(422, "missing field 'prompt' (a string or a list of token ids)", param="prompt",
                       code="missing")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, list) and p and all(is_integral(i) for i in p):
        prompt: str | list[int] = [int(i) for i in p]
    elif isinstance(p, str) and p:
        prompt = p
    else:
        bad = next((i for i, t in enumerate(p) if not is_integral(t)), 0) if isinstance(p, list) else 0
        several = isinstance(p, list) and all(isinstance(t, (str, list)) for t in p)  # a batch of prompts
        why = "is empty" if p in ("", []) else f"has {len(p)} prompts; one per request" if several else \
            f"[{bad}] is {type(p[bad]).__name__}, not a token id (an integer)" if isinstance(p, list) else \
            f"is {type(p).__name__}"
        raise ApiError(422, f"prompt{'' if why[0] == '[' else ' '}{why}: send one string (or one list of token ids)",
                       param="prompt", code="invalid_value")
    if isinstance(prompt, str):
        _check_size(len(prompt), limits, "prompt")
    stream, usage = _stream_options(body)
    if body.get("tools") is not None and body["tools"] != [] or body.get("tool_choice") is not None:
        raise ApiError(422, "tools and tool_choice are for /v1/chat/completions", param="tools", code="unsupported")
    params = sampling(body, limits)
    return GenRequest(prompt, None, params, stream, usage, integer(body, "n", 1, MAX_N, 1),
                      chars=len(prompt) if isinstance(prompt, str) else 0, asked=_asked(body, ("max_tokens",)))


def _asked(body: dict, fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens")) -> str:
    return next((k for k in fields if body.get(k) is not None), "")


def check_room(g: GenRequest, prompt_tokens: int, context: int) -> None:
    """A prompt and the max_tokens a client asked for must fit the context together: a 400 as OpenAI and vLLM
    answer it (an answer cut short with finish_reason "length" would look like the model's choice). The server's
    default max_tokens is cut at the context instead, as vLLM's."""
    if g.asked and prompt_tokens + g.params.max_tokens > context:
        where = "messages" if g.messages is not None else "prompt"
        alone = prompt_tokens >= context  # no max_tokens fits: only a shorter prompt mends it, and it is named
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + g.params.max_tokens} tokens ({prompt_tokens} in the {where}, "
                            f"{g.params.max_tokens} in the completion). Please reduce the length of the {where}"
                            f"{'' if alone else ' or ' + g.asked}.", param=where if alone else g.asked,
                       code="context_length_exceeded")


def _check_size(chars: int, limits: GenLimits, param: str, what: str = "") -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(400, f"{what or param}: {chars} characters; this server tokenizes at most "
                            f"{limits.max_prompt_chars} (more could never fit the model's context)", param=param,
                       code="context_length_exceeded")  # OpenAI's status and code for a prompt past the context


def _content(m: dict, i: int) -> str | None:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                                   for x in c):
        return "\n".join(x["text"] for x in c)  # as vLLM joins them
    raise ApiError(422, f"messages[{i}].content must be a string or a list of text parts", param="messages",
                   code="invalid_type")


def _check_tool_calls(m: dict, i: int) -> None:
    """An earlier answer's tool_calls: [{id?, function: {name, arguments?: JSON text or object}}], as the tool
    formats read them; arguments at most MAX_JSON_DEPTH deep (they are parsed and written again)."""
    calls = m.get("tool_calls")
    if calls is None:
        return

    def well_formed(c) -> bool:
        f = c.get("function") if isinstance(c, dict) else None
        return isinstance(f, dict) and isinstance(f.get("name"), str) \
            and (c.get("id") is None or isinstance(c["id"], str)) \
            and (f.get("arguments") is None or isinstance(f["arguments"], (str, dict)))

    if not isinstance(calls, list) or not all(well_formed(c) for c in calls):
        raise ApiError(422, f"messages[{i}].tool_calls must be a list of {{\"id\": str, \"function\": {{\"name\": "
                            f"str, \"arguments\": a JSON string or object}}}}", param="messages", code="invalid_value")
    for c in calls:
        args = c["function"].get("arguments")
        try:
            deep = json_shape(json.loads(args) if isinstance(args, str) else args)[0] > MAX_JSON_DEPTH
        except ValueError:  # not JSON: shown as the text it is
            deep = False
        except RecursionError:
            deep = True
        if deep:
            raise ApiError(422, f"messages[{i}].tool_calls: arguments nest deeper than {MAX_JSON_DEPTH} levels",
                           param="messages", code="invalid_value")


def chat_request(body: dict, served: str, limits: GenLimits, fmt: GenericFormat = GENERIC,
                 tool_fmt: GenericFormat | None = None) -> GenRequest:
    """`tool_fmt`: the format of the model's tool_use template, where it has one: a request with tools renders
    through that template (GenRequest.tool_use), as apply_chat_template picks it."""
    check_model(body, served)
    if "messages" not in body:
        raise ApiError(422, "missing field 'messages' (a list of {role, content})", param="messages", code="missing")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(422, "messages must be a non-empty list of {role, content}", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(422, f"messages[{i}] must be an object with role in {', '.join(ROLES)}", param="messages",
                           code="invalid_value")
        _check_tool_calls(m, i)
        out.append({k: v for k, v in {**m, "content": _content(m, i)}.items() if v is not None})
    _check_size(sum(len(m.get("content") or "") for m in out), limits, "messages")
    params = sampling(body, limits, chat=True)  # checks max_tokens (OpenAI's older name) even when the newer is given
    if body.get("max_completion_tokens") is not None:
        params = replace(params, max_tokens=integer(body, "max_completion_tokens", 1, limits.max_tokens))
    stream, usage = _stream_options(body)
    tools = tool_spec(body)
    if tools is not None and params.grammar:  # response_format beside tools: content, where not calls, follows it
        tools = replace(tools, answer=response_schema(body))  # (every format's system message shows it)
    fmt = tool_fmt if tools is not None and tool_fmt is not None else fmt
    messages, template_tools = fmt.conversation(out, tools)
    variables = template_variables(body)
    # what the template renders besides content (tool definitions, earlier calls, its variables) is tokenized too
    chars = json_shape(messages)[1] + json_shape(template_tools)[1] + json_shape(variables)[1]
    if chars > limits.max_prompt_chars:
        tools_chars = json_shape(tools.tools)[1] if tools is not None else 0
        param = "tools" if chars - tools_chars <= limits.max_prompt_chars else "messages"
        _check_size(chars, limits, param, "messages and tools" if tools is not None else "messages")
    if tools is not None:
        try:
            params = replace(params, grammar=fmt.grammar(tools) or "")
        except MillisError as e:
            raise ApiError(422, f"tools: {e}", param="tools", code="invalid_value") from None
    return GenRequest(None, messages, params, stream, usage, integer(body, "n", 1, MAX_N, 1), tools, fmt,
                      template_tools, chars, _asked(body), variables, tools is not None and fmt is tool_fmt,
                      prompt_end(body, out))


# ---------------------------------------------------------------------------- bodies

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, index: int, content: str | None, finish: str, logprobs: dict | None = None,
           calls: list | None = None) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": content or "", "logprobs": logprobs, "finish_reason": finish}
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def response(chat: bool, rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": use}


def chunk(chat: bool, rid: str, created: int, model: str, text: str | None, finish: str | None,
          first: bool = False, with_usage: bool = False, logprobs: dict | None = None, index: int = 0,
          calls: list | None = None, calls_only: bool = False) -> bytes:
    """One server-sent event: `data: {chunk}\\n\\n`. Chat: the first delta carries the role (content null when
    the answer can only be calls: tool_choice required or named, as OpenAI streams it); `calls`: tool call
    deltas (index, then id, type, function {name, arguments} or a part of arguments)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": None if calls_only else ""} if first else {}
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        body_choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        body_choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": model, "choices": [body_choice]}
    if with_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return event(body)


def usage_chunk(chat: bool, rid: str, created: int, model: str, use: dict) -> bytes:
    return event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                  "model": model, "choices": [], "usage": use})


def event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"

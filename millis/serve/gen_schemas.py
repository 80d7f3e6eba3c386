"""OpenAI `/v1/completions` and `/v1/chat/completions`: request validation, response and SSE chunk bodies.

A request becomes a `GenRequest` (the prompt or the messages, `SamplingParams`, streaming options);
anything the engine cannot honour is a 4xx `ApiError` naming the field. Defaults are OpenAI's
(temperature 1, top_p 1); `top_k`, `repetition_penalty` and `ignore_eos` are extensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from millis.errors import MillisError
from millis.gen.config import SamplingParams
from millis.serve.schemas import ApiError, check_model

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16
# fields the engine cannot honour: accepted only at their "off" value
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, [])}


@dataclass(frozen=True)
class GenRequest:
    prompt: str | list[int] | None      # /v1/completions: text or token ids
    messages: list[dict] | None         # /v1/chat/completions: [{role, content: str}]
    params: SamplingParams
    stream: bool
    include_usage: bool                 # stream_options.include_usage: a last chunk with `usage`


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float, ok, rule: str) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
        raise ApiError(422, f"{key} must be {rule}, got {v!r}", param=key, code="invalid_value")
    return float(v)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(422, f"{key} must be true or false, got {v!r}", param=key, code="invalid_type")
    return v


def sampling(body: dict, default_max_tokens: int, max_tokens_key: str = "max_tokens") -> SamplingParams:
    for key, off in UNSUPPORTED.items():
        if body.get(key) not in off:
            raise ApiError(422, f"{key} is not supported by this server (leave it unset)", param=key,
                           code="unsupported")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(422, f"n={n!r} is not supported: one choice per request (n=1); send several requests",
                       param="n", code="unsupported")
    mt = body.get(max_tokens_key)
    if mt is None:
        mt = default_max_tokens
    elif not _is_int(mt) or mt < 1:
        raise ApiError(422, f"{max_tokens_key} must be an integer >= 1, got {mt!r}", param=max_tokens_key,
                       code="invalid_value")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise ApiError(422, f"top_k must be an integer >= 0 (-1 or 0 = all), got {top_k!r}", param="top_k",
                       code="invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(422, f"seed must be an integer, got {seed!r}", param="seed", code="invalid_type")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(422, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got {stop!r}",
                       param="stop", code="invalid_value")
    try:
        return SamplingParams(
            max_tokens=mt, temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0"),
            top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            top_k=max(top_k or 0, 0), seed=seed, stop=tuple(stops),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda v: v > 0, "a number > 0"),
            ignore_eos=_bool(body, "ignore_eos"))
    except MillisError as e:
        raise ApiError(422, str(e), code="invalid_value") from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise ApiError(422, f"stream_options must be an object, got {opts!r}", param="stream_options",
                       code="invalid_type")
    return stream, _bool(opts, "include_usage")


def completion_request(body: dict, served: str, default_max_tokens: int) -> GenRequest:
    """prompt: a string, or token ids; a list of one of those is one prompt (more: 422, n=1 only)."""
    check_model(body, served)
    if "prompt" not in body:
        raise ApiError(422, "missing field 'prompt' (a string or a list of token ids)", param="prompt",
                       code="missing")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, list) and p and all(_is_int(i) for i in p):
        prompt: str | list[int] = p
    elif isinstance(p, str) and p:
        prompt = p
    else:
        why = "is empty" if p in ("", []) else (f"has {len(p)} prompts; one per request" if isinstance(p, list)
                                                 else f"is {type(p).__name__}")
        raise ApiError(422, f"prompt {why}: send one string (or one list of token ids)", param="prompt",
                       code="invalid_value")
    stream, usage = _stream_options(body)
    return GenRequest(prompt, None, sampling(body, default_max_tokens), stream, usage)


def _content(m: dict, i: int) -> str | None:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                                   for x in c):
        return "".join(x["text"] for x in c)
    raise ApiError(422, f"messages[{i}].content must be a string or a list of text parts", param="messages",
                   code="invalid_type")


def chat_request(body: dict, served: str, default_max_tokens: int) -> GenRequest:
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
        out.append({k: v for k, v in {**m, "content": _content(m, i)}.items() if v is not None})
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream, usage = _stream_options(body)
    return GenRequest(None, out, sampling(body, default_max_tokens, key), stream, usage)


# ---------------------------------------------------------------------------- bodies

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, created: int, model: str, text: str | None, finish: str | None,
          first: bool = False, with_usage: bool = False) -> bytes:
    """One server-sent event: `data: {chunk}\\n\\n`. Chat: the first delta carries the role."""
    if chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": model, "choices": [choice]}
    if with_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return event(body)


def usage_chunk(chat: bool, rid: str, created: int, model: str, use: dict) -> bytes:
    return event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                  "model": model, "choices": [], "usage": use})


def event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"

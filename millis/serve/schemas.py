"""Request validation and response bodies for the HTTP routes, and their OpenAPI description.

Every bad request becomes an `ApiError` with a 4xx status and a message that names the field:
the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return orjson.dumps({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code or str(self.status)}})


@dataclass(frozen=True)
class Limits:
    max_inputs: int
    max_body_bytes: int


def parse_json(raw: bytes, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}",
                       code="body_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    return body


def texts_of(body: dict[str, Any], key: str, limits: Limits) -> list[str]:
    """`key` as a non-empty list of non-blank strings (a single string is one input)."""
    if key not in body:
        raise ApiError(422, f"missing field '{key}' (a string or a list of strings)", param=key, code="missing")
    v = body[key]
    texts = [v] if isinstance(v, str) else v
    if not isinstance(texts, list):
        raise ApiError(422, f"'{key}' must be a string or a list of strings, got {type(v).__name__}", param=key,
                       code="invalid_type")
    if not texts:
        raise ApiError(422, f"'{key}' is empty: send at least one text", param=key, code="empty_input")
    if len(texts) > limits.max_inputs:
        raise ApiError(413, f"'{key}' has {len(texts)} texts; at most {limits.max_inputs} per request",
                       param=key, code="too_many_inputs")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = " (token-id input is not supported: send text)" if isinstance(t, (int, list)) else ""
            raise ApiError(422, f"{key}[{i}] is {type(t).__name__}, expected a string{hint}", param=key,
                           code="invalid_type")
        if not t.strip():
            raise ApiError(422, f"{key}[{i}] is empty", param=key, code="empty_input")
    return texts


def check_model(body: dict[str, Any], served: str) -> None:
    m = body.get("model")
    if m is not None and m != served:
        raise ApiError(404, f"model {m!r} is not served here; this server serves {served!r}", param="model",
                       code="model_not_found")


def embeddings_request(body: dict[str, Any], served: str, dim: int, limits: Limits) -> tuple[list[str], str]:
    """OpenAI /v1/embeddings: input, model, encoding_format float|base64, dimensions (= native only)."""
    check_model(body, served)
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != dim:
        raise ApiError(422, f"dimensions={dims!r} is not supported: this model gives {dim}", param="dimensions")
    return texts_of(body, "input", limits), fmt


def classify_request(body: dict[str, Any], served: str, n_labels: int, limits: Limits) -> tuple[list[str], int, bool]:
    """millis /v1/classify: inputs, top_k (1..labels), return_logits."""
    check_model(body, served)
    top_k = body.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_labels:
        raise ApiError(422, f"top_k must be an integer in 1..{n_labels}, got {top_k!r}", param="top_k")
    logits = body.get("return_logits", False)
    if not isinstance(logits, bool):
        raise ApiError(422, f"return_logits must be true or false, got {logits!r}", param="return_logits")
    key = "inputs" if "inputs" in body or "input" not in body else "input"
    return texts_of(body, key, limits), top_k, logits


def embeddings_response(out: list[np.ndarray], fmt: str, model: str, tokens: int) -> dict[str, Any]:
    if fmt == "base64":  # OpenAI's: little-endian float32 bytes, base64
        items = [base64.b64encode(np.asarray(e, dtype="<f4").tobytes()).decode() for e in out]
    else:
        items = out  # numpy rows: orjson writes them directly (OPT_SERIALIZE_NUMPY)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def classify_response(out: list[np.ndarray], id2label: dict[int, str], top_k: int, logits: bool,
                      truncated: list[bool], model: str, tokens: int) -> dict[str, Any]:
    x = np.stack(out)
    e = np.exp(x - x.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    data = []
    for i, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")[:top_k]
        item: dict[str, Any] = {"index": i, "label": id2label.get(int(order[0]), str(int(order[0]))),
                                "score": float(p[order[0]]), "truncated": truncated[i]}
        if top_k > 1:
            item["top_k"] = [{"label": id2label.get(int(k), str(int(k))), "score": float(p[k])} for k in order]
        if logits:
            item["logits"] = x[i].tolist()
        data.append(item)
    return {"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _texts_schema(desc: str) -> dict[str, Any]:
    return {"description": desc, "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


_ERROR = {"description": "bad request: {error: {message, type, param, code}}"}
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "millis serve", "version": "1"},
    "paths": {
        "/v1/embeddings": {"post": {
            "summary": "OpenAI-compatible sentence embeddings",
            "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["input"],
                "properties": {"input": _texts_schema("text(s) to embed"), "model": {"type": "string"},
                               "encoding_format": {"enum": ["float", "base64"]},
                               "dimensions": {"type": "integer"}, "user": {"type": "string"}}}}}},
            "responses": {"200": {"description": "{object: list, data: [{object, index, embedding}], model, usage}"},
                          "400": _ERROR, "404": _ERROR, "413": _ERROR, "422": _ERROR,
                          "429": {"description": "queue full; see Retry-After"}, "503": {"description": "not ready, "
                                  "shutting down or timed out"}}}},
        "/v1/classify": {"post": {
            "summary": "sequence classification",
            "requestBody": {"content": {"application/json": {"schema": {"type": "object", "required": ["inputs"],
                "properties": {"inputs": _texts_schema("text(s) to classify"), "model": {"type": "string"},
                               "top_k": {"type": "integer", "minimum": 1}, "return_logits": {"type": "boolean"}}}}}},
            "responses": {"200": {"description": "{object: list, data: [{index, label, score, truncated, top_k?, "
                                                 "logits?}], model, usage}"},
                          "400": _ERROR, "404": _ERROR, "413": _ERROR, "422": _ERROR,
                          "429": {"description": "queue full; see Retry-After"}, "503": {"description": "busy"}}}},
        "/v1/models": {"get": {"summary": "the served model", "responses": {"200": {"description": "OpenAI list"}}}},
        "/health": {"get": {"summary": "alive", "responses": {"200": {"description": "ok"}}}},
        "/ready": {"get": {"summary": "model loaded and warmed",
                           "responses": {"200": {"description": "ready"}, "503": {"description": "loading"}}}},
        "/metrics": {"get": {"summary": "Prometheus text format", "responses": {"200": {"description": "metrics"}}}},
    },
}

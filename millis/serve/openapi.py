"""`/openapi.json` of both servers: request and response schemas that say exactly what the server
accepts and answers (schemathesis checks one against the other in tests/test_serve_fuzz.py).

The spec is built per server and per call: it names the served model, and once the model is loaded
its facts (embedding size, labels, vocabulary, context) become bounds. Every bound here is the one
the validators in `serve.schemas` / `serve.generation.schemas` enforce; a field the server ignores is
left out.
"""
from __future__ import annotations

from typing import Any

from millis.gen.config import (MAX_BIASED_TOKENS, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_OUTPUT_PENALTY, MAX_PENALTY,
                               MAX_TEMPERATURE, MIN_PENALTY, SEED_MAX, SEED_MIN)
from millis.serve.generation import schemas as gs
from millis.serve.generation.fields import UNSUPPORTED
from millis.common.numeric import not_a_reranker
from millis.serve.encoder.rerank import MAX_QUERY_CHARS
from millis.serve.generation.tools import MAX_TOOLS
from millis.serve.live import SECONDS

NULL = {"type": "null"}
TEXT_BODY = {"type": "string"}
TEXT = {"type": "string", "minLength": 1}  # an encoder's text: any but "" (whitespace is one, as TEI and OpenAI say)
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {"400": "malformed JSON, a field missing, of the wrong type or out of bounds, more inputs than the server "
                 "takes, a text over the length it takes, or a request this model cannot serve",
          "404": "unknown model", "413": "body too large",
          "429": "queue full; see Retry-After", "503": "loading, shutting down or timed out; see Retry-After"}
TEI_ERROR = {"type": "object", "required": ["error", "error_type"], "properties": {  # millis's param and code too
    "error": {"type": "string"}, "error_type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}
TEI_ERRORS = {"422": "a field missing, of the wrong type or out of bounds, more inputs than the server takes, or a "
                     "text over the length it takes (TEI's status; an empty input is its 400)"}
USAGE = {"type": "object", "required": ["prompt_tokens", "total_tokens"],
         "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"}}}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, NULL]}


# a long text: true cuts it, false refuses it (4xx), null the server's --too-long; cut at its end only
CUT = {"truncate": nullable({"type": "boolean"}), "truncation_direction": {"enum": ["right", "Right", None]}}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _post(summary: str, request: dict, ok: dict, extra_errors: dict[str, str] | None = None,
          error: dict = ERROR) -> dict:
    errors = {**ERRORS, **(extra_errors or {})}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": _json(request)},
                     "responses": {"200": {"description": "OK", "content": ok},
                                   **{k: {"description": v, "content": _json(error)} for k, v in errors.items()}}}}


def _tei_post(summary: str, request: dict, ok: dict, extra_errors: dict[str, str] | None = None) -> dict:
    """A TEI route: TEI's statuses (TEI_ERRORS, and the route's own) and its error body (TEI_ERROR)."""
    return _post(summary, request, ok, {**TEI_ERRORS, **(extra_errors or {})}, TEI_ERROR)


NOT_READY = "loading, failed or draining"


def _get(summary: str, ok: dict | None = None, unavailable: str = "") -> dict:
    """unavailable: what a 503 says ("" none)."""
    responses: dict[str, Any] = {"200": {"description": summary, **({"content": ok} if ok else {})}}
    if unavailable:
        responses["503"] = {"description": unavailable}
    return {"get": {"summary": summary, "responses": responses}}


def _common(name: str) -> dict[str, Any]:
    models = {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object"], "properties": {"id": {"const": name},
                                                                        "object": {"const": "model"}}}}}}
    card = models["properties"]["data"]["items"]
    one = {"get": {"summary": "the served model's card (OpenAI's models.retrieve)", "parameters": [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}], "responses": {
        "200": {"description": "the card", "content": _json(card)},
        "404": {"description": "another model", "content": _json(ERROR)}}}}
    return {"/v1/models": _get("the served model", _json(models)), "/v1/models/{id}": one,
            "/health": _get("alive", unavailable="the model failed to load"),
            "/ready": _get("model loaded and warmed", unavailable=NOT_READY),
            "/metrics": _get("Prometheus text format"),
            "/stats": _stats(), "/dashboard": _get("a live page of /stats", {"text/html": {"schema": TEXT_BODY}})}


def _stats() -> dict[str, Any]:
    """/stats: per-second series and a last-minute summary (their keys: millis.serve.live.Live.snapshot)."""
    obj = {"type": "object"}
    ok = {"type": "object", "required": ["now", "window_s", "series", "summary", "model", "gauges"], "properties": {
        "now": {"type": "number"}, "window_s": {"type": "integer", "minimum": 1, "maximum": SECONDS},
        "series": obj, "summary": obj, "model": obj, "gauges": obj}}
    window = {"name": "window", "in": "query", "required": False, "description": "seconds of per-second series",
              "schema": {"type": "integer", "minimum": 1, "maximum": SECONDS}}
    return {"get": {"summary": "the last minutes of this server, per second", "parameters": [window],
                    "responses": {"200": {"description": "OK", "content": _json(ok)},
                                  "400": {"description": "window is not an integer in 1..600",
                                          "content": _json(ERROR)}}}}


def schema(op: dict, *where: str) -> dict:
    """The JSON schema of an operation's request body (where: "requestBody") or of an answer ("responses", "200")."""
    for key in where:
        op = op[key]
    return op["content"]["application/json"]["schema"]


def _spec(title: str, paths: dict) -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": title, "version": "1"}, "paths": paths}


# ------------------------------------------------------------------------------------ encoder

def encoder_spec(task: str, name: str, max_inputs: int, dim: int = 0, n_labels: int = 0, vocab_size: int = 0,
                 unit: bool = False, max_length: int = 0, problem_type: str = "", token_states: bool = True,
                 sparse: bool = True, prompts: tuple[str, ...] = ()) -> dict[str, Any]:
    """task embed / classify, or "" when unknown before loading (both routes); dim / n_labels / vocab_size /
    max_length 0 while the model loads; unit: the model's vectors are normalized in its graph (TEI's normalize=false
    refused); problem_type: a classifier's (with n_labels: whether it reranks, numeric.not_a_reranker);
    token_states: its runtime gives them (/embed_all; without, the route refuses every request: 424); sparse: it pools
    SPLADE vectors (/embed_sparse, 424 otherwise); prompts: the names of its prompts (TEI's prompt_name)."""
    prompt = {"prompt_name": {"enum": [*prompts, None]}}  # one of them, or none
    texts = {"oneOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": max_inputs}]}
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                     **({"maximum": vocab_size - 1} if vocab_size else {})}}
    embed_input = {"oneOf": [*texts["oneOf"], ids, {"type": "array", "items": ids, "minItems": 1,
                                                    "maxItems": max_inputs}],
                   "description": "texts, or token ids (OpenAI's [int] / [[int]]) taken as they are: no special "
                                  "tokens added, cut at the model's max length"}
    model = {"enum": [name, None]}
    paths = _common(name)
    if task in ("", "embed"):
        req = {"type": "object", "required": ["input"], "properties": {
            "input": embed_input, "model": model, "encoding_format": {"enum": ["float", "base64", None]},
            # (a SPLADE model's vector weighs its vocabulary: no cut below it, schemas.dimensions_of)
            "dimensions": nullable({"type": "integer", "minimum": dim if sparse and dim else 1,
                                    **({"maximum": dim} if dim else {})}), **CUT}}
        item = {"type": "object", "required": ["object", "index", "embedding"], "properties": {
            "object": {"const": "embedding"}, "index": {"type": "integer", "minimum": 0},
            "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}
        ok = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"}, "model": {"const": name}, "usage": USAGE,
            "data": {"type": "array", "items": item, "minItems": 1}}}
        paths["/v1/embeddings"] = _post("OpenAI-compatible sentence embeddings", req, _json(ok))
        req = {"type": "object", "required": ["inputs"], "properties": {
            "inputs": embed_input, "normalize": {"const": True} if unit else {"type": "boolean"},
            **CUT, **prompt,
            "dimensions": req["properties"]["dimensions"]}}
        vecs = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
        paths["/embed"] = _tei_post("text-embeddings-inference's /embed: a vector per text", req, _json(vecs))
        if token_states:  # (without them the route refuses every request, 424: not published, as rerank's routes)
            req = {"type": "object", "required": ["inputs"], "properties": {"inputs": embed_input, **CUT, **prompt}}
            paths["/embed_all"] = _tei_post("text-embeddings-inference's /embed_all: every token's last hidden state, "
                                            "before pooling", req, _json({"type": "array", "items": vecs}),
                                            {"424": "this artifact's runtime returns pooled vectors alone",
                                             "413": "a body over the limit, or more token vectors than "
                                                    "--max-batch-tokens"})
        if sparse:
            req = {"type": "object", "required": ["inputs"], "properties": {"inputs": embed_input, **CUT, **prompt}}
            weight = {"type": "object", "required": ["index", "value"], "properties": {
                "index": {"type": "integer", "minimum": 0}, "value": {"type": "number"}}}
            paths["/embed_sparse"] = _tei_post("text-embeddings-inference's /embed_sparse: a SPLADE model's nonzero "
                                               "vocabulary weights per text", req, _json(
                                                   {"type": "array", "items": {"type": "array", "items": weight}}),
                                               {"424": "the model pools no SPLADE vectors"})
        req = {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"type": "object", "required": ["source_sentence", "sentences"], "properties": {
                "source_sentence": TEXT, "sentences": {"type": "array", "items": TEXT, "minItems": 1,
                                                       "maxItems": max(max_inputs - 1, 0)}}},
            "parameters": nullable({"type": "object", "properties": {**CUT, **prompt}})}}
        paths["/similarity"] = _tei_post("text-embeddings-inference's /similarity: each sentence's cosine with the "
                                         "source sentence", req, _json({"type": "array", "items": {"type": "number"}}))
    if task in ("", "classify"):  # (a classifier that is no cross-encoder: no rerank routes, numeric.not_a_reranker)
        top_k = {"type": "integer", "minimum": 1, **({"maximum": n_labels} if n_labels else {})}
        req = {"type": "object", "properties": {"inputs": texts, "input": texts, "model": model, "top_k": top_k,
                                                "return_logits": {"type": "boolean"}, **CUT},
               "oneOf": [{"required": ["inputs"]}, {"required": ["input"]}]}
        scored = {"type": "object", "required": ["label", "score"],
                  "properties": {"label": {"type": "string"}, "score": {"type": "number"}}}
        item = {"type": "object", "required": ["index", "label", "score", "truncated"], "properties": {
            "index": {"type": "integer"}, "label": {"type": "string"}, "score": {"type": "number"},
            "truncated": {"type": "boolean"}, "top_k": {"type": "array", "items": scored},
            "logits": {"type": "array", "items": {"type": "number"}}}}
        ok = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"}, "model": {"const": name}, "usage": USAGE,
            "data": {"type": "array", "items": item, "minItems": 1}}}
        paths["/v1/classify"] = _post("sequence classification: a label and score per text", req, _json(ok))
        labels = {"type": "array", "items": scored}
        pair = {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 2}  # [text] or [text, text_pair]
        req = {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"oneOf": [TEXT, pair, {"type": "array", "items": pair, "minItems": 1, "maxItems": max_inputs}],
                       "description": "one sequence (a text, or [text, text_pair]), or a batch: a list of those"},
            "raw_scores": nullable({"type": "boolean"}), "truncate": nullable({"type": "boolean"}),
            "parameters": nullable({"type": "object", "properties": {  # huggingface_hub's text_classification
                "function_to_apply": nullable({"enum": ["softmax", "sigmoid", "none"]}),
                "top_k": nullable({"type": "integer", "minimum": 1, "maximum": 1 << 31})}})}}
        paths["/predict"] = _tei_post("text-embeddings-inference's /predict: every label by score, for one sequence "
                                      "(a list of those for a batch)", req,
                                      _json({"oneOf": [labels, {"type": "array", "items": labels}]}))
    if task in ("", "classify") and not not_a_reranker(n_labels or 1, problem_type):
        doc = {"oneOf": [TEXT, {"type": "object", "required": ["text"], "properties": {"text": TEXT}}]}
        req = {"type": "object", "required": ["query", "documents"], "properties": {
            "query": {**TEXT, "maxLength": MAX_QUERY_CHARS}, "model": model,
            "return_documents": nullable({"type": "boolean"}), "raw_scores": nullable({"type": "boolean"}),
            "truncate": nullable({"type": "boolean"}),
            "max_tokens_per_doc": nullable({"type": "integer", "minimum": max(max_length, 1)}),  # below it: a 400
            "documents": {"type": "array", "items": doc, "minItems": 1, "maxItems": max_inputs},
            "top_n": nullable({"type": "integer", "minimum": 1})}}
        hit = {"type": "object", "required": ["index", "relevance_score"], "properties": {
            "index": {"type": "integer", "minimum": 0}, "relevance_score": {"type": "number"},
            "truncated": {"type": "boolean"}, "document": {"type": "object"}}}
        ok = {"type": "object", "required": ["id", "model", "results", "usage"], "properties": {
            "id": {"type": "string"}, "model": {"const": name}, "usage": {"type": "object"},
            "results": {"type": "array", "items": hit}}}
        paths["/v1/rerank"] = _post("cross-encoder reranking (Jina / Cohere shape): documents by relevance to "
                                    "the query", req, _json(ok))
        paths["/v2/rerank"] = _post("the same, where Cohere's v2 client posts", req, _json(ok))
        req = {"type": "object", "required": ["query", "texts"], "properties": {
            "query": req["properties"]["query"], "texts": {"type": "array", "items": TEXT, "minItems": 1,
                                                           "maxItems": max_inputs},
            "return_text": nullable({"type": "boolean"}), "raw_scores": nullable({"type": "boolean"}),
            "truncate": nullable({"type": "boolean"})}}
        hit = {"type": "object", "required": ["index", "score"], "properties": {
            "index": {"type": "integer", "minimum": 0}, "score": {"type": "number"}, "text": {"type": "string"}}}
        paths["/rerank"] = _tei_post("text-embeddings-inference's /rerank: texts by relevance to the query", req,
                                     _json({"type": "array", "items": hit}))
    info = {"type": "object", "required": ["model_id", "model_type", "max_input_length", "max_client_batch_size"],
            "properties": {"prompts": nullable({"type": "object", "additionalProperties": {"type": "string"}})}}
    paths["/info"] = _get("text-embeddings-inference's /info: the model and the server's bounds", _json(info),
                          unavailable=NOT_READY)
    # TEI's routes by model type: an embedder's /embed, a one-label classifier's /rerank, another's /predict
    same = "/embed" if task == "embed" else ("/rerank" if n_labels == 1 else "/predict") if task == "classify" else ""
    for path in ("/", "/invocations") if same else ():
        paths[path] = {"post": {**paths[same]["post"], "summary": f"text-embeddings-inference's {same}, by model type"}}
        if same == "/embed":  # `inputs` as an object: /similarity's body (huggingface_hub's sentence_similarity)
            both = [paths[r]["post"] for r in (same, "/similarity")]
            body, ok = ([schema(op, *where) for op in both] for where in (("requestBody",), ("responses", "200")))
            paths[path]["post"].update(requestBody={"required": True, "content": _json({"oneOf": body})}, responses={
                **both[0]["responses"], "200": {"description": "OK", "content": _json({"oneOf": ok})}})
    for path in ("/", "/ping"):  # TEI's health check (SageMaker's /ping): /ready's answer
        paths.setdefault(path, {}).update(_get("model loaded and warmed (text-embeddings-inference's health)",
                                               unavailable=NOT_READY))
    tok_item = {"type": "object", "required": ["index", "tokens", "count", "truncated"], "properties": {
        "index": {"type": "integer", "minimum": 0}, "tokens": {"type": "array", "items": {"type": "integer"}},
        "count": {"type": "integer", "minimum": 0}, "truncated": {"type": "boolean"}}}
    ok = {"type": "object", "required": ["object", "data", "model", "max_length"], "properties": {
        "object": {"const": "list"}, "model": {"const": name}, "max_length": {"type": "integer"},
        "data": {"type": "array", "items": tok_item, "minItems": 1}}}
    # TEI's shape (tei_tokens.py) for `inputs`: a list per text of its tokens, uncut, byte offsets into the text
    offset = nullable({"type": "integer", "minimum": 0})
    simple = {"type": "object", "required": ["id", "text", "special", "start", "stop"], "properties": {
        "id": {"type": "integer", "minimum": 0}, "text": {"type": "string"}, "special": {"type": "boolean"},
        "start": offset, "stop": offset}}
    tei_ok = {"type": "array", "items": {"type": "array", "items": simple}, "minItems": 1}
    req = {"type": "object", "properties": {"input": texts, "inputs": texts, "model": model,
                                            "add_special_tokens": nullable({"type": "boolean"}), **prompt},
           "oneOf": [{"required": ["inputs"], "not": {"required": ["input"]}},
                     {"required": ["input"], "properties": {"prompt_name": {"type": "null"}},  # (no prompt put)
                      "not": {"anyOf": [{"required": ["inputs"]}, {"required": ["add_special_tokens"]}]}}]}
    paths["/tokenize"] = _post("the token ids the model runs for each text (`input`: cut at its max length, as "
                               "inference is); `inputs`: text-embeddings-inference's tokens with offsets, uncut",
                               req, _json({"oneOf": [ok, tei_ok]}), TEI_ERRORS, {"anyOf": [ERROR, TEI_ERROR]})
    paths["/decode"] = _post("text-embeddings-inference's /decode: token ids as text",
                             {"type": "object", "required": ["ids"], "properties": {
                                 "ids": {"oneOf": [ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": max_inputs}]},
                                 "skip_special_tokens": nullable({"type": "boolean"})}},
                             _json({"type": "array", "items": {"type": "string"}}), TEI_ERRORS, TEI_ERROR)
    return _spec("millis serve (encoder)", paths)


# ------------------------------------------------------------------------------------ generation

def _sampling(limits: gs.GenLimits) -> dict[str, Any]:
    stop_s = {"type": "string", "minLength": 1, "maxLength": gs.MAX_STOP_CHARS}
    off = {k: {"enum": list(v)} if all(not isinstance(x, (dict, list)) for x in v) else
           nullable({"type": "array", "maxItems": 0}) for k, v in UNSUPPORTED.items()}
    off["tools"] = nullable({"type": "array", "maxItems": 0})
    return {
        "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens}),
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE}),
        "top_p": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": nullable({"type": "integer", "minimum": -1, "maximum": gs.MAX_TOP_K}),
        "seed": nullable({"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX}),
        "logprobs": {"anyOf": [NULL, {"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}],
                     "description": "chat: true / false; completions: how many top alternatives per token"},
        "top_logprobs": nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS}),
        "repetition_penalty": nullable({"type": "number", "minimum": MIN_PENALTY, "maximum": MAX_PENALTY}),
        **{k: nullable({"type": "number", "minimum": -MAX_OUTPUT_PENALTY, "maximum": MAX_OUTPUT_PENALTY})
           for k in ("presence_penalty", "frequency_penalty")},
        "logit_bias": nullable({"type": "object", "maxProperties": MAX_BIASED_TOKENS,
                                "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                                "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                         "maximum": MAX_LOGIT_BIAS}}),
        "ignore_eos": nullable({"type": "boolean"}), "stream": nullable({"type": "boolean"}),
        "stream_options": nullable({"type": "object", "properties": {"include_usage": nullable({"type": "boolean"})}}),
        "n": nullable({"type": "integer", "minimum": 1, "maximum": limits.max_n}),
        "stop": {"anyOf": [NULL, stop_s, {"type": "array", "items": stop_s, "maxItems": gs.MAX_STOPS}]},
        "response_format": {"anyOf": [NULL, {"type": "object", "required": ["type"], "additionalProperties": False,
                                             "properties": {"type": {"enum": ["text", "json_object"]}}},
                                      {"type": "object", "required": ["type", "json_schema"], "properties": {
                                          "type": {"const": "json_schema"}, "json_schema": {
                                              "type": "object", "required": ["name", "schema"], "properties": {
                                                  "name": {"type": "string"}, "strict": nullable({"type": "boolean"}),
                                                  "schema": {"type": "object"}}}}}]},
        **off}


def _choice_ok(chat: bool, name: str) -> dict:
    finish = {"enum": ["stop", "length", "tool_calls"] if chat else ["stop", "length"]}
    if chat:
        call = {"type": "object", "required": ["id", "type", "function"], "properties": {
            "id": {"type": "string"}, "type": {"const": "function"}, "function": {
                "type": "object", "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
        choice = {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
            "index": {"type": "integer"}, "finish_reason": finish, "message": {
                "type": "object", "required": ["role", "content"],
                "properties": {"role": {"const": "assistant"}, "content": nullable({"type": "string"}),
                               "tool_calls": {"type": "array", "items": call}}}}}
    else:
        choice = {"type": "object", "required": ["index", "text", "finish_reason"], "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish}}
    body = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
        "id": {"type": "string", "pattern": "^chatcmpl-" if chat else "^cmpl-"},
        "object": {"const": "chat.completion" if chat else "text_completion"}, "created": {"type": "integer"},
        "model": {"const": name}, "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": gs.MAX_N},
        "usage": USAGE}}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}  # one SSE event
    return {**_json(body), "text/event-stream": {"schema": event}}


def generation_spec(name: str, limits: gs.GenLimits | None, vocab_size: int = 0) -> dict[str, Any]:
    """Before the model is loaded (limits None) the spec has no model-dependent bounds."""
    limits = limits or gs.GenLimits(256, 1 << 20, 1 << 30)
    model = {"enum": [name, None]}
    ids = {"type": "array", "minItems": 1, "maxItems": max(1, limits.max_tokens - 1),
           "items": {"type": "integer", "minimum": 0, **({"maximum": vocab_size - 1} if vocab_size else {})}}
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars}
    prompt = {"anyOf": [text, ids, {"type": "array", "items": text, "minItems": 1, "maxItems": 1},
                        {"type": "array", "items": ids, "minItems": 1, "maxItems": 1}]}
    completion = {"type": "object", "required": ["prompt"],
                  "properties": {"prompt": prompt, "model": model, **_sampling(limits)}}
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": list(gs.ROLES)}, "content": {"anyOf": [NULL, {"type": "string"},
                                                                {"type": "array", "items": part}]}}}
    function = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": {"type": "string"},
        "parameters": {"type": "object"}}}
    tool = {"type": "object", "required": ["type", "function"], "properties": {"type": {"const": "function"},
                                                                               "function": function}}
    chat = {"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "items": message, "minItems": 1}, "model": model,
        "max_completion_tokens": nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens}),
        **_sampling(limits), "tools": nullable({"type": "array", "items": tool, "maxItems": MAX_TOOLS}),
        "tool_choice": {"anyOf": [NULL, {"enum": ["none", "auto"]}], "description": "required or a named function "
                                                                                     "need tools"},
        "parallel_tool_calls": nullable({"type": "boolean"})}}
    paths = _common(name)
    failed = {"500": "this request failed inside the engine (its batch-mates ran on)"}
    paths["/v1/completions"] = _post("OpenAI-compatible text completion (stream: server-sent events)", completion,
                                     _choice_ok(False, name), failed)
    paths["/v1/chat/completions"] = _post("OpenAI-compatible chat completion (stream: server-sent events)", chat,
                                          _choice_ok(True, name), failed)
    tokens = {"type": "array", "items": ids["items"]}
    paths["/tokenize"] = _post("a prompt or a conversation (through the chat template) as token ids",
                               {"type": "object", "properties": {"prompt": text, "messages": chat["properties"]["messages"],
                                                                 "model": model}},
                               _json({"type": "object", "required": ["tokens", "count"], "properties": {
                                   "tokens": tokens, "count": {"type": "integer"}, "max_model_len": {"type": "integer"}}}),
                               {})
    paths["/detokenize"] = _post("token ids as text", {"type": "object", "required": ["tokens"],
                                                       "properties": {"tokens": tokens}},
                                 _json({"type": "object", "required": ["prompt"], "properties": {
                                     "prompt": {"type": "string"}}}), {})
    return _spec("millis serve (generation)", paths)

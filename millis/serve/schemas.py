"""Request validation and response bodies of the encoder routes, and what both servers' validators share
(`ApiError`, body `Limits`, JSON parsing, integer fields); their OpenAPI description is millis.serve.openapi.

Every bad request becomes an `ApiError` with a 4xx status and a message that names the field:
the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from millis.common.errors import MillisError
from millis.common.numeric import label_scores, unit_rows
from millis.encoder.text import prompt_texts


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self, tei: bool = False) -> bytes:
        """OpenAI's error object; tei: text-embeddings-inference's, {"error": message, "error_type": kind} (its
        clients read `error` as the message: huggingface_hub showed millis's object as a dict), with millis's param
        and code beside them."""
        code = self.code or str(self.status)
        if tei:
            kind = "overloaded" if self.status == 429 else "unhealthy" if self.status == 503 else \
                "backend" if self.status >= 500 or self.status == 424 else \
                "empty" if code == "empty_input" else "validation"
            return orjson.dumps({"error": self.message, "error_type": kind, "param": self.param, "code": code})
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return orjson.dumps({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})


@dataclass(frozen=True)
class Limits:
    max_inputs: int
    max_body_bytes: int
    body_timeout_s: float = 30.0  # a body not all received by then is answered 408 (a stalled client)


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


EXACT_FLOAT_INT = 1 << 53  # past this a float (how a JSON parser reads 2**64 + 1) no longer says which integer


def is_integral(v: Any) -> bool:
    """An integer as JSON Schema means it: 14 or 14.0 (never true / false); a float only where it is
    exact, so -9223372036854775809, read as the float -2**63, is not taken for -2**63."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, float) and v.is_integer() and abs(v) <= EXACT_FLOAT_INT)


def integer(body: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int | None:
    """body[key] as an integer in lo..hi (absent or null: default); an integer-valued float (`14.0`,
    as some clients send) counts as one."""
    v = body.get(key)
    if v is None:
        return default
    if not is_integral(v) or not lo <= v <= hi:
        raise ApiError(422, f"{key} must be an integer in {lo}..{hi}, got {v!r}", param=key, code="invalid_value")
    return int(v)


def boolean(body: dict[str, Any], key: str, default: bool | None = None) -> bool | None:
    """body[key] as true / false (absent or null: default)."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(422, f"{key} must be true or false, got {v!r}", param=key, code="invalid_type")
    return v


# JSON a request nests (schemas, tool arguments): Python's json and the grammar compiler recurse per level,
# with a limit near 1000 levels; a body can nest deeper (orjson reads 1024). Deeper is a 422.
MAX_JSON_DEPTH = 100


def json_shape(value: Any) -> tuple[int, int]:
    """(nesting depth, characters of its keys, strings and scalars) of a parsed JSON value: what a template
    may render of it. Walked with a stack, so a value nested past the recursion limit is measured too."""
    depth = chars = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            chars += sum(len(k) for k in v)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        else:
            chars += len(v if isinstance(v, str) else str(v))
            continue
        depth = max(depth, d + 1)
    return depth, chars


def same_value(v: Any, ref: Any) -> bool:
    """Equal as JSON values: 0 == 0.0, but false is not 0 and true is not 1."""
    return v == ref and isinstance(v, bool) == isinstance(ref, bool)


def texts_of(body: dict[str, Any], key: str, limits: Limits, name: str | None = None) -> list[str]:
    """`key` as a non-empty list of non-empty strings (a single string is one input); errors name it `name` (default:
    key)."""
    if key not in body:
        key = name or key
        raise ApiError(422, f"missing field '{key}' (a string or a list of strings)", param=key, code="missing")
    v = body[key]
    key = name or key  # what the errors below call it
    if v == "":  # a bare string: no index to name
        raise ApiError(422, f"'{key}' is empty: send a non-empty text", param=key, code="empty_input")
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
            hint = (" (token ids are taken by /v1/embeddings and /embed only, and not mixed with text)"
                    if isinstance(t, (int, list)) else "")
            raise ApiError(422, f"{key}[{i}] is {type(t).__name__}, expected a string{hint}", param=key,
                           code="invalid_type")
        if not t:  # "" only: whitespace is a text (TEI and OpenAI embed it; a chunk of spaces failed its batch)
            raise ApiError(422, f"{key}[{i}] is empty", param=key, code="empty_input")
    return texts


@dataclass(frozen=True)
class TokenInput:
    """/v1/embeddings' `input` given as token ids (OpenAI's [int] for one input, [[int]] for several), as
    `embedding_input` found it: rows of ids not yet checked (`token_rows` checks them, off the event loop
    when they are many)."""
    rows: list[list[Any]]
    nested: bool  # [[int]]: an id is named input[i][j]; [int]: one input, input[j]
    key: str = "input"  # the field they came in (TEI's /embed: inputs)

    @property
    def size(self) -> int:
        return sum(map(len, self.rows))


def embedding_input(body: dict[str, Any], limits: Limits, key: str = "input") -> list[str] | TokenInput:
    """/v1/embeddings' `input` (TEI's /embed: `inputs`): a string, a list of strings, a list of token ids or a
    list of lists of them. The lists' shape is checked here; the ids themselves by `token_rows`."""
    v = body.get(key)
    if not (isinstance(v, list) and v and (isinstance(v[0], list) or is_integral(v[0]))):
        return texts_of(body, key, limits)
    return id_rows(v, key, limits)


def id_rows(v: list, key: str, limits: Limits) -> TokenInput:
    """A non-empty list `v` of token ids ([int]: one input) or of lists of them ([[int]]: at most --max-inputs, none
    empty) as rows; the ids themselves are checked by `token_rows`."""
    if not isinstance(v[0], list):
        return TokenInput([v], nested=False, key=key)
    if len(v) > limits.max_inputs:
        raise ApiError(413, f"'{key}' has {len(v)} inputs; at most {limits.max_inputs} per request", param=key,
                       code="too_many_inputs")
    for i, row in enumerate(v):
        if not isinstance(row, list):
            raise ApiError(422, f"{key}[{i}] is {type(row).__name__}, expected a list of token ids (as {key}[0])",
                           param=key, code="invalid_type")
        if not row:
            raise ApiError(422, f"{key}[{i}] is an empty list of token ids", param=key, code="empty_input")
    return TokenInput(v, nested=True, key=key)


def token_rows(given: TokenInput, vocab_size: int) -> list[list[int]]:
    """The given rows as ints, every id checked to be an integer in 0..vocab_size-1: the model's ids as they
    are (an id past the embedding table faults a CUDA device, failing every request on it)."""
    out = []
    for i, row in enumerate(given.rows):
        if set(map(type, row)) == {int} and min(row) >= 0 and max(row) < vocab_size:  # all fine: C loops only
            out.append(row)
            continue
        for j, t in enumerate(row):
            if not (is_integral(t) and 0 <= t < vocab_size):
                where = f"{given.key}[{i}][{j}]" if given.nested else f"{given.key}[{j}]"
                raise ApiError(422, f"{where} is {t!r}: a token id is an integer in 0..{vocab_size - 1} (this "
                                    f"model's vocabulary)", param=given.key, code="invalid_value")
        out.append([int(t) for t in row])
    return out


def given_ids(given: TokenInput, vocab_size: int, max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids sent as they are (no special tokens added), checked against the vocabulary and cut to
    max_length like texts (the cut reported)."""
    rows = token_rows(given, vocab_size)
    return [r[:max_length] for r in rows], [len(r) > max_length for r in rows]


def too_long(field: str, i: int | str, pair: bool, first_alone: bool, max_length: int, server_rule: bool) -> ApiError:
    """The 413 for text i of `field` over the model's length (i: its index, or its whole name as a str): of a pair,
    the query (or /predict's `inputs`: the pair's first text) where that alone is too long, else the pair;
    server_rule: the server refuses long texts, else the request asked truncate=false."""
    if isinstance(i, str):  # the text's own name (/similarity's inputs.source_sentence, inputs.sentences[j])
        what = i
    elif pair and first_alone:
        field, what = (field, f"{field}[{i}]'s first text") if field == "inputs" else ("query", "query")
    else:
        what = f"{field}[{i}]" + (f" with {'its first text' if field == 'inputs' else 'the query'}" if pair else "")
    why = "the server rejects long texts" if server_rule else "the request asked truncate=false"
    return ApiError(413, f"{what} is longer than the model's {max_length} tokens ({why}; send shorter ones)",
                    param=i.split("[")[0] if isinstance(i, str) else field, code="text_too_long")


def reject_of(truncate: bool | None) -> bool | None:
    """The request's `truncate` as the server's tokenize reads it: false refuses long texts, true cuts them whatever
    the server's rule (TEI: `truncate.unwrap_or(auto_truncate)`), absent leaves the server's rule."""
    return None if truncate is None else not truncate


def check_cut(body: dict[str, Any]) -> None:
    """TEI's fields millis does not do, refused rather than ignored on every encoder route (a left cut read as a right
    one gave another vector without a word): a left cut, and a prompt where the route puts none (`prompted`)."""
    check_direction(body)
    check_prompt(body)


def prompted(body: dict[str, Any], texts: list[str] | TokenInput, prompts: dict[str, str]) -> list[str] | TokenInput:
    """TEI's `prompt_name` (/embed, /embed_all, /embed_sparse, /tokenize, /similarity): the model's named prompt (its
    sentence-transformers prompts, `read_prompts`) before each text, as sentence-transformers' encode(prompt_name=)
    puts it; absent or null: the texts as they are; 422 naming the field otherwise."""
    check_direction(body)
    name = body.get("prompt_name")
    if name is None:
        return texts
    if not isinstance(name, str):
        raise ApiError(422, f"prompt_name must be a string, got {type(name).__name__}", param="prompt_name",
                       code="invalid_type")
    if isinstance(texts, TokenInput):
        raise ApiError(422, "prompt_name puts a prompt before texts, not before token ids", param="prompt_name",
                       code="invalid_value")
    try:
        return prompt_texts(texts, prompts, name)
    except MillisError as e:
        raise ApiError(422, str(e), param="prompt_name", code="invalid_value") from None


def check_direction(body: dict[str, Any]) -> None:
    """TEI's truncation_direction: right (millis's cut) or absent; left refused, not made a right one."""
    d = body.get("truncation_direction")
    if d is not None and d not in ("right", "Right"):
        raise ApiError(422, f"truncation_direction {d!r}: texts are cut at their end here (right)",
                       param="truncation_direction", code="unsupported" if d in ("left", "Left") else "invalid_value")


def check_prompt(body: dict[str, Any]) -> None:
    """TEI's `prompt_name` on a route that puts no prompt (`prompted`'s routes do): refused, not ignored."""
    if body.get("prompt_name") is not None:
        raise ApiError(422, "prompt_name is not supported on this route (TEI's /embed, /embed_all, /embed_sparse, "
                            "/tokenize and /similarity take it): put the prompt at the start of your texts",
                       param="prompt_name", code="unsupported")


def check_model(body: dict[str, Any], served: str) -> None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise ApiError(422, f"model must be a string (the served model's name), got {type(m).__name__}",
                       param="model", code="invalid_type")
    if m is not None and m != served:
        raise ApiError(404, f"model {m!r} is not served here; this server serves {served!r}", param="model",
                       code="model_not_found")


def dimensions_of(body: dict[str, Any], dim: int, sparse: bool) -> int:
    """`dimensions`: 1..dim (absent or null: dim). A SPLADE model's (`sparse`) vector weighs each vocabulary entry:
    its first k entries are the first k token ids, no shorter embedding, so only its own size is taken."""
    dims = integer(body, "dimensions", 1, dim, dim)
    if sparse and dims < dim:
        raise ApiError(422, f"dimensions is not available: this model's vectors weigh its {dim} vocabulary entries "
                            f"(SPLADE), and their first {dims} are no shorter embedding",
                       param="dimensions", code="invalid_value")
    return dims


def embeddings_request(body: dict[str, Any], served: str, dim: int, limits: Limits,
                       sparse: bool = False) -> tuple[list[str] | TokenInput, str, int, bool | None]:
    """OpenAI /v1/embeddings: input (texts or token ids: `embedding_input`), model, encoding_format
    float|base64, dimensions (`dimensions_of`, then `shortened`), truncate (`reject_of`; as the other routes read
    it)."""
    check_model(body, served)
    check_cut(body)
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ("float", "base64"):
        raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format",
                       code="invalid_value")
    reject = reject_of(boolean(body, "truncate"))
    return embedding_input(body, limits), fmt, dimensions_of(body, dim, sparse), reject


def shortened(out: list[np.ndarray], dims: int, unit: bool) -> list[np.ndarray]:
    """Each vector's first `dims` values (OpenAI's `dimensions`, a Matryoshka cut), made unit length again when
    `unit` (the model's vectors are); at the model's own size the vectors as they are."""
    if not out or dims >= len(out[0]):
        return out
    cut = np.stack(out)[:, :dims]
    return list(unit_rows(cut)) if unit else list(cut)


def classify_request(body: dict[str, Any], served: str, n_labels: int,
                     limits: Limits) -> tuple[list[str], int, bool, bool | None]:
    """millis /v1/classify: inputs, top_k (1..labels), return_logits, truncate (`reject_of`)."""
    check_model(body, served)
    check_cut(body)
    if "top_k" in body and body["top_k"] is None:
        raise ApiError(422, f"top_k must be an integer in 1..{n_labels}, got null", param="top_k", code="invalid_value")
    top_k = integer(body, "top_k", 1, n_labels, 1)
    logits = body.get("return_logits", False)
    if not isinstance(logits, bool):
        raise ApiError(422, f"return_logits must be true or false, got {logits!r}", param="return_logits",
                       code="invalid_type")
    return input_texts(body, limits)[0], top_k, logits, reject_of(boolean(body, "truncate"))


def input_texts(body: dict[str, Any], limits: Limits, default: str = "inputs") -> tuple[list[str], str]:
    """(texts, the field they came in): `inputs` (HF's, TEI's) or `input` (OpenAI's), not both; with neither, the
    error names `default`. A prompt_name is refused: the routes that put one read their texts through `prompted`."""
    check_prompt(body)
    if "inputs" in body and "input" in body:
        raise ApiError(422, "give the texts as 'inputs' or 'input', not both", param=default, code="invalid_body")
    key = "inputs" if "inputs" in body else "input" if "input" in body else default
    return texts_of(body, key, limits), key


def embeddings_response(out: list[np.ndarray], fmt: str, model: str, tokens: int) -> dict[str, Any]:
    if fmt == "base64":  # OpenAI's: little-endian float32 bytes, base64
        items = [base64.b64encode(np.asarray(e, dtype="<f4").tobytes()).decode() for e in out]
    else:
        items = out  # numpy rows: orjson writes them directly (OPT_SERIALIZE_NUMPY)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def classify_response(out: list[np.ndarray], id2label: dict[int, str], top_k: int, logits: bool,
                      truncated: list[bool], model: str, tokens: int, problem_type: str = "") -> dict[str, Any]:
    x = np.stack(out)                                                      # (n, labels) logits
    probs = label_scores(x, problem_type)                                  # one logit: its sigmoid
    tops = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].tolist()  # per row: top_k labels, best first
    data = []
    for i, (p, order) in enumerate(zip(probs.tolist(), tops)):  # Python floats and ints: no numpy per item
        item: dict[str, Any] = {"index": i, "label": id2label.get(order[0], str(order[0])), "score": p[order[0]],
                                "truncated": truncated[i]}
        if top_k > 1:
            item["top_k"] = [{"label": id2label.get(k, str(k)), "score": p[k]} for k in order]
        if logits:
            item["logits"] = x[i].tolist()
        data.append(item)
    return {"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

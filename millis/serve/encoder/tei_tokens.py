"""text-embeddings-inference's POST /tokenize and POST /decode on the encoder server, with the tokenizer inference
runs (the encoder's Rust tokenizer; TEI's router/src/http/types.rs and server.rs give the shapes):

    POST /tokenize {"inputs": "..." | ["...", ...], "add_special_tokens": true, "prompt_name": null | "<a prompt>"}
        -> [[{"id": int, "text": str, "special": bool, "start": int | null, "stop": int | null}, ...], ...]
    POST /decode   {"ids": [int] | [[int], ...], "skip_special_tokens": true} -> ["...", ...]

One list per input, a single string or id list too (a list of one). `start`, `stop`: UTF-8 BYTE offsets into the
input, as TEI gives them (Rust's tokenizers count bytes: "é" is 2 wide, a CJK character 3); `text` is the input's
slice there (original case and accents, "ing" for "##ing"). A special token the tokenizer added ([CLS], [SEP]) has
its token string as `text` and null offsets, as TEI's `into_tokens`. Not truncated: TEI's /tokenize never is (a
text over the model's length lists every token; inference keeps its first max_length - 1 and its last); a text of
more than max_length x 250 characters is refused, TEI's bound. /tokenize with `input` (millis's shape) is app.py's.
Errors: TEI's statuses (an empty input 400, any other bad field 422: `http.api_status`) in the server's one body.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import numpy as np
import orjson
from starlette.responses import Response

from millis.common.rust_tokenizer import GIL_FREE_CHARS, encode_all
from millis.serve.encoder import tei
from millis.serve.http import api_status, error_response, json_response
from millis.serve.schemas import ApiError, Limits, TokenInput, boolean, id_rows, prompted, texts_of, token_rows

MAX_CHAR_MULTIPLIER = 250  # TEI's: /tokenize takes a text of at most max_length x this many characters
Off = Callable[..., Awaitable[Any]]  # off(size, fn, *args): fn(*args), in a thread while the request lasts if large


def rust_tokenizer(enc) -> Any | None:
    """The Rust tokenizer the encoder's token_ids runs (untruncated, unpadded, shared by threads); None where the
    encoder has only a slow transformers tokenizer (no offsets)."""
    return getattr(enc, "rust_tokenizer", None)


def tokenize_request(body: dict[str, Any], limits: Limits, max_length: int,
                     prompts: dict[str, str] | None = None) -> tuple[list[str], bool]:
    """(texts, add_special_tokens) of a TEI /tokenize body (`prompt_name`: the prompt before each text, as /embed
    puts it); 4xx naming the field."""
    texts = prompted(body, texts_of(body, "inputs", limits), prompts or {})  # strings, none empty, <= --max-inputs
    most = max_length * MAX_CHAR_MULTIPLIER
    for i, t in enumerate(texts):
        if len(t) > most:
            raise ApiError(413, f"inputs[{i}] has {len(t)} characters; at most {most} (the model's {max_length} "
                                f"tokens x {MAX_CHAR_MULTIPLIER}, as TEI)", param="inputs", code="text_too_long")
    return texts, boolean(body, "add_special_tokens", True)


def byte_offsets(text: str) -> list[int] | None:
    """The UTF-8 byte offset of each character position 0..len(text); None for ASCII (the same numbers)."""
    if text.isascii():
        return None
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return [0, *np.cumsum(width).tolist()]


def simple_tokens(e, text: str) -> bytes:
    """TEI's SimpleToken list of one encoding of `text` as JSON (the Python binding's char offsets made byte offsets).
    Built as bytes, not dicts: a 1 MB body is ~1M tokens, and a million dicts cost a full GC pass and their freeing
    (~200 ms with the GIL held: the event loop's), and ~0.5 GB."""
    at = byte_offsets(text)
    out = []
    for i, (s, t), special, piece in zip(e.ids, e.offsets, e.special_tokens_mask, e.tokens):
        if special:
            out.append(b'{"id":%d,"text":%s,"special":true,"start":null,"stop":null}' % (i, orjson.dumps(piece)))
        else:
            out.append(b'{"id":%d,"text":%s,"special":false,"start":%d,"stop":%d}'
                       % (i, orjson.dumps(text[s:t]), s if at is None else at[s], t if at is None else at[t]))
    return b"[" + b",".join(out) + b"]"


def tokens_of(enc, texts: list[str], special: bool) -> bytes:
    """The JSON of each text's tokens in TEI's shape, untruncated; a slow tokenizer's without offsets (null)."""
    tok = rust_tokenizer(enc)
    if tok is not None:
        rows = [simple_tokens(e, t) for e, t in zip(encode_all(tok, texts, special), texts)]
    else:
        specials = set(enc.tok.all_special_ids)
        rows = [orjson.dumps([{"id": int(i), "text": p, "special": int(i) in specials, "start": None, "stop": None}
                              for i, p in zip(ids, enc.tok.convert_ids_to_tokens(list(ids)))])
                for ids in enc.ids_of(texts, special)]
    return b"[" + b",".join(rows) + b"]"


def decode_request(body: dict[str, Any], limits: Limits, max_length: int) -> tuple[TokenInput, bool]:
    """(ids as rows, skip_special_tokens) of a TEI /decode body: `ids` [int] (one row) or [[int]] (at most
    --max-inputs rows), no row empty or over max_length x 250 ids (what /tokenize's longest text could give, so a
    body's worth of ids is not decoded as one string); the ids themselves are checked by `decoded`."""
    if "ids" not in body:
        raise ApiError(422, "missing field 'ids' (a list of token ids, or a list of such lists)", param="ids",
                       code="missing")
    v = body["ids"]
    if not isinstance(v, list):
        raise ApiError(422, f"'ids' must be a list of token ids or a list of such lists, got {type(v).__name__}",
                       param="ids", code="invalid_type")
    if not v:
        raise ApiError(422, "'ids' is empty: send at least one token id", param="ids", code="empty_input")
    given = id_rows(v, "ids", limits)  # [int] or at most --max-inputs [[int]], none empty
    most = max_length * MAX_CHAR_MULTIPLIER
    for i, row in enumerate(given.rows):
        if len(row) > most:
            raise ApiError(422, f"ids[{i}] has {len(row)} ids; at most {most} a list", param="ids",
                           code="invalid_value")
    return given, boolean(body, "skip_special_tokens", True)


def decoded(enc, given: TokenInput, vocab_size: int, skip: bool) -> list[str]:
    """Each row's text; every id an integer in 0..vocab_size-1, else 422 naming `ids` (Rust's decode would drop an
    unknown id silently). Few short rows one by one; more by decode_batch, off the GIL."""
    rows = token_rows(given, vocab_size)
    tok = rust_tokenizer(enc)
    if tok is None:
        return [enc.tok.decode(r, skip_special_tokens=skip) for r in rows]
    if len(rows) <= 8 and given.size <= GIL_FREE_CHARS:
        return [tok.decode(r, skip_special_tokens=skip) for r in rows]
    return tok.decode_batch(rows, skip_special_tokens=skip)


async def tokenize(model, body: dict[str, Any], limits: Limits, off: Off) -> Response:
    """TEI's /tokenize answer, or its error with TEI's status (the /tokenize route answers millis's shape 400)."""
    try:
        texts, special = tokenize_request(body, limits, model.max_length, model.encoder.prompts)
        body = await off(sum(map(len, texts)), tokens_of, model.encoder, texts, special)
        return Response(body, 200, media_type="application/json")
    except ApiError as e:
        e.status = api_status(e, tei.INVALID)
        return error_response(e, tei=True)


async def decode(model, body: dict[str, Any], limits: Limits, off: Off) -> Response:
    """TEI's /decode answer (its route answers errors as TEI's: tei.INVALID)."""
    given, skip = decode_request(body, limits, model.max_length)
    return json_response(await off(given.size, decoded, model.encoder, given, model.vocab_size, skip))

"""Reranking on a cross-encoder (a sequence classifier over a (query, document) pair, such as
ms-marco-MiniLM), in two request shapes:

    POST /v1/rerank (Jina's / Cohere's)
    {"query": "...", "documents": ["...", {"text": "..."}], "top_n": 3, "return_documents": true, "raw_scores": false}
    -> {"id", "model", "results": [{"index", "relevance_score", "document": {"text"}}], "usage": {"total_tokens"}}

    POST /rerank (text-embeddings-inference's)
    {"query": "...", "texts": ["..."], "return_text": true, "raw_scores": false}
    -> [{"index", "score", "text"}]

Each pair is tokenized as the model was trained ([CLS] query [SEP] document [SEP], token types 0 then 1;
a pair over the model's length loses the end of its document) and goes through the server's one queue
as rows of their own, batched with other requests' rows. Documents of a request whose pairs tokenize the same
(the same text; "Card" and "card" on an uncased model) run once and share their score (a row's last bits depend
on its place in a batch, so duplicates run apart could rank apart). `return_documents` defaults to false, as
Cohere's API (Jina's defaults to true: send it); a document sent as an object comes back as sent. `truncate`
false refuses a pair over the model's length (413); Cohere v2's `max_tokens_per_doc` is taken where it cuts
nothing the model's length does not (at least that length), and fields of a ranking this route does not do
(`rank_fields`, `max_chunks_per_doc`) are refused, never ignored. The score: a one-logit model's sigmoid, else
(two labels: not relevant, relevant) the probability of the last label, in 0..1 as Cohere, Jina and TEI give it;
`raw_scores` gives its log-odds instead (the logit of a one-logit model; the same order). Results come most relevant
first, ties by `index`, the document's place in the request. A classifier of three or more labels (an intent or NLI
model) is not a reranker: its rerank routes answer 400 (`model_not_reranker`)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from millis.common.numeric import not_a_reranker, relevance_scores
from millis.serve.schemas import ApiError, Limits, boolean, check_cut, check_model, reject_of


MAX_QUERY_CHARS = 16384  # tokenized once per document: bounded work per request (models read <= ~512 tokens)


@dataclass(frozen=True)
class Shape:
    """One request shape's field names."""
    documents: str
    return_documents: str
    cohere: bool  # Cohere's / Jina's fields (documents as objects, max_tokens_per_doc), refused ones named


COHERE = Shape("documents", "return_documents", cohere=True)
TEI = Shape("texts", "return_text", cohere=False)
UNSUPPORTED = ("rank_fields", "max_chunks_per_doc")  # Cohere's ranking over object fields / document chunks


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int
    return_documents: bool
    raw_scores: bool
    reject: bool | None = None  # `truncate` false: refuse a pair over the model's length; true: cut; None: the server's
    sent: tuple[Any, ...] = ()  # each document as the request gave it (a string or an object), for return_documents


def _fail(msg: str, param: str, code: str = "invalid_value", status: int = 422) -> ApiError:
    return ApiError(status, msg, param=param, code=code)


def whole(v: Any) -> bool:
    """A positive integer as JSON gives it (an integer-valued float too, of any size; JSON Schema's integer)."""
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) and v >= 1


def top_n_of(body: dict[str, Any], n_docs: int) -> int:
    """top_n: any integer >= 1 (an integer-valued float too, of any size); past the documents (or absent):
    all of them, as Cohere's API answers."""
    v = body.get("top_n")
    if v is None:
        return n_docs
    if not whole(v):
        raise _fail(f"top_n must be a positive integer, got {v!r}", "top_n")
    return n_docs if v >= n_docs else int(v)


def check_doc_tokens(body: dict[str, Any], max_length: int) -> None:
    """Cohere v2's max_tokens_per_doc: an integer; below the model's length it would cut documents shorter than the
    model does, which this route does not do (a 400, never a silent longer document)."""
    v = body.get("max_tokens_per_doc")
    if v is None:
        return
    if not whole(v):
        raise _fail(f"max_tokens_per_doc must be a positive integer, got {v!r}", "max_tokens_per_doc")
    if v < max_length:
        raise _fail(f"max_tokens_per_doc {v} is below the model's {max_length} tokens: only the model's length cuts "
                    f"documents here (send {max_length} or more, or leave it out)", "max_tokens_per_doc",
                    "unsupported_value")


def rerank_request(body: dict[str, Any], served: str, limits: Limits, shape: Shape = COHERE,
                   max_length: int = 0, labels: int = 1, problem_type: str = "") -> RerankRequest:
    """The request checked; errors name the field (`shape`: which names the fields go by; max_length: the model's,
    which bounds max_tokens_per_doc; labels, problem_type: the model's head, one that is not a cross-encoder's
    refused: 400, and on TEI's route TEI's 424, its answer to /rerank on a classifier)."""
    check_model(body, served)
    if why := not_a_reranker(labels, problem_type):
        raise _fail(f"model {served} {why}; {'/v1/classify' if shape.cohere else '/predict'} answers its labels",
                    "model", "model_not_reranker", 400 if shape.cohere else 424)
    if not shape.cohere:
        check_cut(body)  # TEI's truncation_direction: a left cut refused, not made a right one
    else:
        for f in UNSUPPORTED:
            if body.get(f) is not None:
                raise _fail(f"{f} is not supported: send each document's text (as a string or {{\"text\": ...}})",
                            f, "unsupported_field")
        check_doc_tokens(body, max_length)
    q = body.get("query")
    if not isinstance(q, str) or not q or len(q) > MAX_QUERY_CHARS:  # the code as /v1/embeddings' input gives it
        raise _fail(f"query must be a non-empty string of at most {MAX_QUERY_CHARS} characters", "query",
                    "missing" if q is None else "invalid_type" if not isinstance(q, str) else
                    "empty_input" if not q else "invalid_value")
    key = shape.documents
    docs = body.get(key)
    if not isinstance(docs, list) or not docs:
        raise _fail(f"{key} must be a non-empty list of strings (or {{\"text\": ...}} objects)", key,
                    "invalid_type" if not isinstance(docs, list) else "empty_input")
    if len(docs) > limits.max_inputs:
        raise _fail(f"{key} has {len(docs)} items; at most {limits.max_inputs} per request", key,
                    "too_many_inputs", 413)
    texts = []
    for i, d in enumerate(docs):
        t = d.get("text") if isinstance(d, dict) else d
        if not isinstance(t, str) or not t:
            raise _fail(f"{key}[{i}] must be a non-empty string or {{\"text\": <string>}}", key,
                        "invalid_type" if not isinstance(t, str) else "empty_input")
        texts.append(t)
    return RerankRequest(q, texts, top_n_of(body, len(texts)), boolean(body, shape.return_documents, False),
                         boolean(body, "raw_scores", False), reject_of(boolean(body, "truncate")), tuple(docs))


def distinct(keys: list[Any]) -> tuple[list[Any], list[int], list[int]]:
    """(each key once, in first-seen order; for every key its place in that list; for each of those its first
    index in keys). Keys: texts, or token rows as tuples."""
    first: dict[Any, int] = {}
    where = [first.setdefault(t, len(first)) for t in keys]
    firsts = [0] * len(first)
    for i in reversed(range(len(keys))):
        firsts[where[i]] = i
    return list(first), where, firsts


def relevance(out: list[np.ndarray], raw: bool = False) -> np.ndarray:
    """(N,) scores from the model's (N, labels) logits (numeric.relevance_scores, the rule the fidelity gate ranks
    by too)."""
    return relevance_scores(np.stack(out), raw)


def ranked(scores: np.ndarray, top_n: int) -> list[int]:
    """The top_n indices, best first, ties in index order."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:top_n]]


def pair_key(row: list[int]) -> tuple[Any, ...]:
    """What a pair row runs as: its ids and where its second segment starts (token types)."""
    return (getattr(row, "second", None), *map(int, row))


def rerank_response(scores: np.ndarray, sent: tuple[Any, ...], top_n: int, with_docs: bool, truncated: list[bool],
                    model: str, tokens: int) -> dict[str, Any]:
    """sent: the documents as the request gave them (a string comes back as {"text": ...}, an object as it is)."""
    results = []
    for i in ranked(scores, top_n):
        r: dict[str, Any] = {"index": i, "relevance_score": float(scores[i]), "truncated": truncated[i]}
        if with_docs:
            r["document"] = sent[i] if isinstance(sent[i], dict) else {"text": sent[i]}
        results.append(r)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
            "usage": {"total_tokens": tokens}}


def tei_rerank_response(scores: np.ndarray, docs: list[str], top_n: int, with_text: bool) -> list[dict[str, Any]]:
    out = []
    for i in ranked(scores, top_n):
        r: dict[str, Any] = {"index": i, "score": float(scores[i])}
        if with_text:
            r["text"] = docs[i]
        out.append(r)
    return out

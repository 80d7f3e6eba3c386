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
as rows of their own, batched with other requests' rows. Identical documents of a request run once and
share their score (a row's last bits depend on its place in a batch, so duplicates run apart could rank
apart). The score: a one-logit model's sigmoid, else the probability of the last label, in 0..1 as Cohere,
Jina and TEI give it; `raw_scores` gives its log-odds instead (the logit of a one-logit model; the same order). Results come most relevant
first, ties by `index`, the document's place in the request."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from millis.common.numeric import relevance_scores
from millis.serve.schemas import ApiError, Limits, boolean, check_model


MAX_QUERY_CHARS = 16384  # tokenized once per document: bounded work per request (models read <= ~512 tokens)


@dataclass(frozen=True)
class Shape:
    """One request shape's field names."""
    documents: str
    return_documents: str
    truncate: bool  # reads `truncate` (TEI's)


COHERE = Shape("documents", "return_documents", truncate=False)
TEI = Shape("texts", "return_text", truncate=True)


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int
    return_documents: bool
    raw_scores: bool
    reject: bool = False  # `truncate`: false refuses a pair over the model's length


def _fail(msg: str, param: str, code: str = "invalid_value", status: int = 422) -> ApiError:
    return ApiError(status, msg, param=param, code=code)


def top_n_of(body: dict[str, Any], n_docs: int) -> int:
    """top_n: any integer >= 1 (an integer-valued float too, of any size); past the documents (or absent):
    all of them, as Cohere's API answers."""
    v = body.get("top_n")
    if v is None:
        return n_docs
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or v < 1:
        raise _fail(f"top_n must be a positive integer, got {v!r}", "top_n")
    return n_docs if v >= n_docs else int(v)


def rerank_request(body: dict[str, Any], served: str, limits: Limits, shape: Shape = COHERE) -> RerankRequest:
    """The request checked; errors name the field (`shape`: which names the fields go by)."""
    check_model(body, served)
    q = body.get("query")
    if not isinstance(q, str) or not q.strip() or len(q) > MAX_QUERY_CHARS:
        raise _fail(f"query must be a non-empty string of at most {MAX_QUERY_CHARS} characters", "query")
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
        if not isinstance(t, str) or not t.strip():
            raise _fail(f"{key}[{i}] must be a non-empty string or {{\"text\": <string>}}", key,
                        "invalid_type" if not isinstance(t, str) else "empty_input")
        texts.append(t)
    return RerankRequest(q, texts, top_n_of(body, len(texts)), boolean(body, shape.return_documents, False),
                         boolean(body, "raw_scores", False), shape.truncate and boolean(body, "truncate") is False)


def distinct(texts: list[str]) -> tuple[list[str], list[int], list[int]]:
    """(each text once, in first-seen order; for every text its place in that list; for each of those its first
    index in texts)."""
    first: dict[str, int] = {}
    where = [first.setdefault(t, len(first)) for t in texts]
    firsts = [0] * len(first)
    for i in reversed(range(len(texts))):
        firsts[where[i]] = i
    return list(first), where, firsts


def relevance(out: list[np.ndarray], raw: bool = False) -> np.ndarray:
    """(N,) scores from the model's (N, labels) logits (numeric.relevance_scores, the rule the fidelity gate ranks
    by too)."""
    return relevance_scores(np.stack(out), raw)


def ranked(scores: np.ndarray, top_n: int) -> list[int]:
    """The top_n indices, best first, ties in index order."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:top_n]]


def rerank_response(scores: np.ndarray, docs: list[str], top_n: int, with_docs: bool, truncated: list[bool],
                    model: str, tokens: int) -> dict[str, Any]:
    results = []
    for i in ranked(scores, top_n):
        r: dict[str, Any] = {"index": i, "relevance_score": float(scores[i]), "truncated": truncated[i]}
        if with_docs:
            r["document"] = {"text": docs[i]}
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

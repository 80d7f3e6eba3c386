"""POST /v1/rerank (Jina's / Cohere's shape) on a cross-encoder: a sequence classifier over a
(query, document) pair, such as ms-marco-MiniLM.

    {"query": "...", "documents": ["...", {"text": "..."}], "top_n": 3, "return_documents": true}
    -> {"id", "model", "results": [{"index", "relevance_score", "document": {"text"}}], "usage": {"total_tokens"}}

Each pair is tokenized as the model was trained ([CLS] query [SEP] document [SEP], token types 0 then 1;
a pair over the model's length loses the end of its document) and goes through the server's one queue
as rows of their own, batched with other requests' rows. relevance_score: the logit of a one-logit
model (a higher score is more relevant; it is what the model was trained to rank by), else the
probability of the last label. Results come most relevant first; `index` is the document's place in
the request."""
from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from millis.common.numeric import softmax
from millis.serve.schemas import ApiError, Limits, check_model, integer


MAX_QUERY_CHARS = 16384  # tokenized once per document: bounded work per request (models read <= ~512 tokens)


def _fail(msg: str, param: str, code: str = "invalid_value", status: int = 422) -> ApiError:
    return ApiError(status, msg, param=param, code=code)


def rerank_request(body: dict[str, Any], served: str, limits: Limits) -> tuple[str, list[str], int, bool]:
    """(query, documents, top_n, return_documents), checked; errors name the field."""
    check_model(body, served)
    q = body.get("query")
    if not isinstance(q, str) or not q.strip() or len(q) > MAX_QUERY_CHARS:
        raise _fail(f"query must be a non-empty string of at most {MAX_QUERY_CHARS} characters", "query")
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise _fail("documents must be a non-empty list of strings (or {\"text\": ...} objects)", "documents")
    if len(docs) > limits.max_inputs:
        raise _fail(f"documents has {len(docs)} items; at most {limits.max_inputs} per request", "documents",
                    "too_many_inputs", 413)
    texts = []
    for i, d in enumerate(docs):
        t = d.get("text") if isinstance(d, dict) else d
        if not isinstance(t, str) or not t.strip():
            raise _fail(f"documents[{i}] must be a non-empty string or {{\"text\": <string>}}", "documents")
        texts.append(t)
    top_n = min(integer(body, "top_n", 1, 2**31 - 1, len(texts)), len(texts))  # more than sent: all (as Cohere)
    ret = body.get("return_documents", False)
    if not isinstance(ret, bool):
        raise _fail(f"return_documents must be true or false, got {ret!r}", "return_documents", "invalid_type")
    return q, texts, top_n, ret


def relevance(out: list[np.ndarray]) -> np.ndarray:
    """(N,) scores from the model's (N, labels) logits."""
    x = np.stack(out).astype(np.float64)
    return x[:, 0] if x.shape[1] == 1 else softmax(x)[:, -1]


def rerank_response(scores: np.ndarray, docs: list[str], top_n: int, with_docs: bool, truncated: list[bool],
                    model: str, tokens: int) -> dict[str, Any]:
    results = []
    for i in np.argsort(-scores, kind="stable")[:top_n]:
        r: dict[str, Any] = {"index": int(i), "relevance_score": float(scores[i]), "truncated": truncated[i]}
        if with_docs:
            r["document"] = {"text": docs[i]}
        results.append(r)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
            "usage": {"total_tokens": tokens}}

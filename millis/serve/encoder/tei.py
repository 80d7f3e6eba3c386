"""text-embeddings-inference's request shapes on the encoder server, so a TEI client points at millis as it is:

    POST /embed    {"inputs": "..." | ["..."], "normalize": true, "truncate": null, "dimensions": null}
                   -> [[float, ...], ...]
    POST /predict  {"inputs": "..." | ["..."], "raw_scores": false, "truncate": null}
                   -> [{"label", "score"}, ...] for one text (every label, best first), a list of those for a list
    POST /rerank   {"query", "texts", "return_text", "raw_scores"}: millis.serve.encoder.rerank

`truncate`: false refuses a text over the model's length (413 naming `inputs`), true or absent cuts it, unless the
server refuses long texts (`--too-long reject`). `normalize`: the vectors made unit length (TEI's default); false
gives them as the model computes them, which a model that normalizes in its graph cannot (422). Errors keep the
server's one shape (OpenAI's `{"error": {...}}`) with TEI's status codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from millis.common.numeric import label_scores, unit_rows

INVALID = 422  # TEI answers a field missing, of the wrong type or out of bounds 422 (OpenAI's routes: 400)
from millis.serve.schemas import ApiError, Limits, boolean, integer, shortened, texts_of


@dataclass(frozen=True)
class TeiRequest:
    texts: list[str]
    single: bool            # `inputs` was one string: /predict answers one list, not a list of lists
    truncate: bool | None   # None: the server's rule
    normalize: bool = True
    dimensions: int = 0
    raw_scores: bool = False


def embed_request(body: dict[str, Any], dim: int, graph_normalizes: bool, limits: Limits) -> TeiRequest:
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ApiError(422, f"normalize must be true or false, got {normalize!r}", param="normalize",
                       code="invalid_type")
    if not normalize and graph_normalizes:
        raise ApiError(422, "normalize=false is not available: this model normalizes its vectors in its graph",
                       param="normalize", code="invalid_value")
    return TeiRequest(texts_of(body, "inputs", limits), isinstance(body.get("inputs"), str), boolean(body, "truncate"),
                      normalize, integer(body, "dimensions", 1, dim, dim))


def embed_response(out: list[np.ndarray], req: TeiRequest, graph_normalizes: bool) -> list[np.ndarray]:
    vecs = shortened(out, req.dimensions, graph_normalizes)
    return list(unit_rows(np.stack(vecs))) if req.normalize and not graph_normalizes else vecs


def predict_request(body: dict[str, Any], limits: Limits) -> TeiRequest:
    v = body.get("inputs")
    if isinstance(v, list) and v and isinstance(v[0], list):
        raise ApiError(422, "inputs: text pairs are scored by /rerank (a query and its texts) here, not /predict",
                       param="inputs", code="invalid_type")
    return TeiRequest(texts_of(body, "inputs", limits), isinstance(v, str), boolean(body, "truncate"),
                      raw_scores=boolean(body, "raw_scores", False))


def predict_response(out: list[np.ndarray], id2label: dict[int, str], req: TeiRequest,
                     problem_type: str = "") -> list[Any]:
    x = np.stack(out).astype(np.float64)                           # (n, labels) logits
    scores = x if req.raw_scores else label_scores(x, problem_type)
    items = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda k: -row[k])     # every label, best first (ties: label order)
        items.append([{"label": id2label.get(k, str(k)), "score": row[k]} for k in order])
    return items[0] if req.single else items

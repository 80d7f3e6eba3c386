"""text-embeddings-inference's request shapes on the encoder server, so a TEI client points at millis as it is:

    POST /embed    {"inputs": "..." | ["..."] | [ids] | [[ids]], "normalize": true, "truncate": null,
                    "dimensions": null} -> [[float, ...], ...]
    POST /predict  {"inputs": ..., "raw_scores": false, "truncate": null}: `inputs` as TEI reads it, a string or a
                   list of 1-2 strings is one sequence (a text, or a (text, text_pair) pair) answered with one list
                   [{"label", "score"}, ...] (every label, best first); a list of such lists is a batch, answered
                   with a list of those; huggingface_hub's "parameters": {"function_to_apply", "top_k"} read too
    POST /rerank   {"query", "texts", "return_text", "raw_scores"}: millis.serve.encoder.rerank
    POST /embed_all {"inputs": ..., "truncate": null} -> [[[float, ...] a token, ...] a text, ...]: every token's last
                   hidden state (special tokens too), before pooling: the native and torch runtimes' (another's, 424)
    POST /embed_sparse {"inputs": ..., "truncate": null} -> [[{"index": int, "value": float}, ...] a text, ...]: a
                   SPLADE model's nonzero vocabulary weights (another model: 424); its /embed gives the whole vector
    POST /similarity {"inputs": {"source_sentence": "...", "sentences": ["...", ...]}, "parameters": {"truncate":
                   null}} -> [cosine of each sentence with the source, ...] (one batch, as TEI embeds them)
    POST /, /invocations: whichever of these the model's task serves (TEI's routes by model type; huggingface_hub's
                   InferenceClient posts to the URL it is given: an embedder's `inputs` as an object is its
                   sentence_similarity); GET /info: TEI's facts about the model; GET / and /ping: /ready's answer
    POST /tokenize {"inputs": ...} and POST /decode {"ids": ...}: millis.serve.encoder.tei_tokens

`truncate`: false refuses a text over the model's length (422 naming `inputs`), true cuts it, absent follows the
server's rule (`--too-long reject` refuses; TEI's auto_truncate). `normalize`: the vectors made unit length (TEI's
default); false gives them as the model computes them, which a model that normalizes in its graph cannot (422).
Texts are cut at their end (`truncation_direction` left is refused: not ignored; /rerank's too). `prompt_name` (one of
the model's sentence-transformers prompts) is put before each text on /embed, /embed_all, /embed_sparse, /tokenize and
/similarity (under `parameters`), refused elsewhere.
Errors in TEI's shape (`{"error": message, "error_type": kind}`, millis's param and code beside) with TEI's
status codes (http.api_status).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from millis import __version__
from millis.common.numeric import label_scores, row_cosines, sigmoid, softmax, unit_rows
from millis.encoder.source import SPLADE
from millis.serve.http import TEI_INVALID
from millis.serve.schemas import (ApiError, Limits, TokenInput, boolean, check_cut, dimensions_of, embedding_input,
                                  check_prompt, integer, prompted, shortened, texts_of)

INVALID = TEI_INVALID  # a field missing, of the wrong type or out of bounds: 422, and errors in TEI's shape


@dataclass(frozen=True)
class TeiRequest:
    texts: list[str] | TokenInput  # /predict: each sequence's (first) text
    single: bool            # one sequence, not a batch: /predict answers one list, not a list of lists
    truncate: bool | None   # None: the server's rule
    normalize: bool = True
    dimensions: int = 0
    raw_scores: bool = False
    seconds: tuple = ()     # /predict: each sequence's text_pair, or None
    function: str = ""      # /predict: softmax | sigmoid | none (the logits); "" the model's (label_scores)
    top_k: int = 0          # /predict: the best top_k labels; 0 every label


# huggingface_hub's text_classification sends {"parameters": {"function_to_apply", "top_k"}} to /predict (TEI drops
# them unread): read here, so its top_k=2 gets two labels and "none" the logits
FUNCTIONS = {"softmax": softmax, "sigmoid": sigmoid, "none": np.asarray}


def embed_request(body: dict[str, Any], dim: int, graph_normalizes: bool, limits: Limits,
                  sparse: bool = False, prompts: dict[str, str] | None = None) -> TeiRequest:
    """TEI's /embed: `inputs` (texts or token ids), `prompt_name` (`prompted`: one of `prompts`), `truncate`,
    `normalize`, `dimensions`."""
    texts = prompted(body, embedding_input(body, limits, "inputs"), prompts or {})
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ApiError(422, f"normalize must be true or false, got {normalize!r}", param="normalize",
                       code="invalid_type")
    if not normalize and graph_normalizes:
        raise ApiError(422, "normalize=false is not available: this model normalizes its vectors in its graph",
                       param="normalize", code="invalid_value")
    return TeiRequest(texts, isinstance(body.get("inputs"), str), boolean(body, "truncate"), normalize,
                      dimensions_of(body, dim, sparse))


def embed_all_request(body: dict[str, Any], limits: Limits, route: str = "/embed_all",
                      prompts: dict[str, str] | None = None) -> TeiRequest:
    """TEI's /embed_all and /embed_sparse: `inputs` and `prompt_name` as /embed's, `truncate`; no normalize or
    dimensions (token states, or SPLADE's vocabulary weights, as the model computes them)."""
    texts = prompted(body, embedding_input(body, limits, "inputs"), prompts or {})
    what = "each token's state" if route == "/embed_all" else "each text's vocabulary weights"
    for key in ("normalize", "dimensions"):
        if body.get(key) is not None:
            raise ApiError(422, f"{key} is a field of /embed: {route} gives {what} as the model computes them",
                           param=key, code="invalid_value")
    return TeiRequest(texts, isinstance(body.get("inputs"), str), boolean(body, "truncate"))


def sparse_model(model) -> bool:
    """Whether a loaded model pools SPLADE vectors (its /embed_sparse answers; others refuse it, 424)."""
    return model is not None and model.task == "embed" and model.meta.source.pooling.mode == SPLADE


def embed_response(out: list[np.ndarray], req: TeiRequest, graph_normalizes: bool) -> list[np.ndarray]:
    vecs = shortened(out, req.dimensions, graph_normalizes)
    return list(unit_rows(np.stack(vecs))) if req.normalize and not graph_normalizes else vecs


def parameters_of(body: dict[str, Any]) -> dict[str, Any]:
    """The body's `parameters` object (huggingface_hub's; absent or null: none)."""
    params = {} if body.get("parameters") is None else body["parameters"]
    if not isinstance(params, dict):
        raise ApiError(422, f"parameters must be an object, got {type(params).__name__}", param="parameters",
                       code="invalid_type")
    return params


def similarity_request(body: dict[str, Any], limits: Limits, prompts: dict[str, str] | None = None) -> TeiRequest:
    """TEI's /similarity (huggingface_hub's sentence_similarity): `inputs` {"source_sentence", "sentences"}, the
    cut's fields and `prompt_name` under `parameters` (TEI reads them there only); texts: the source sentence, then
    each sentence (the prompt before each)."""
    v = body.get("inputs")
    if not isinstance(v, dict):
        got = "missing" if v is None else type(v).__name__
        raise ApiError(422, f"inputs must be an object {{\"source_sentence\": text, \"sentences\": [text, ...]}}, "
                            f"got {got}", param="inputs", code="missing" if v is None else "invalid_type")
    params = parameters_of(body)
    check_prompt(body)  # (TEI reads it under parameters only: not ignored at the top)
    prompted(params, [], prompts or {})  # (the fields checked before the texts)
    source = v.get("source_sentence")
    if not isinstance(source, str) or not source:
        what = "missing" if source is None else "empty" if isinstance(source, str) else f"a {type(source).__name__}"
        raise ApiError(422, f"inputs.source_sentence is {what}: send the text to compare the sentences with",
                       param="inputs.source_sentence", code={"missing": "missing", "empty": "empty_input"}.get(
                           what, "invalid_type"))
    if not isinstance(v.get("sentences", []), list):
        raise ApiError(422, f"inputs.sentences must be a list of texts, got {type(v['sentences']).__name__}",
                       param="inputs.sentences", code="invalid_type")
    sentences = texts_of(v, "sentences", limits, name="inputs.sentences")
    if len(sentences) + 1 > limits.max_inputs:
        raise ApiError(413, f"inputs.sentences has {len(sentences)} texts: with the source sentence at most "
                            f"{limits.max_inputs} per request", param="inputs.sentences", code="too_many_inputs")
    return TeiRequest(prompted(params, [source, *sentences], prompts or {}), False,
                      boolean({"parameters.truncate": params.get("truncate")}, "parameters.truncate"))


def similarity_places(n: int) -> list[str]:
    """The names of /similarity's n texts as a request gives them (a 413 names the one over the length)."""
    return ["inputs.source_sentence", *(f"inputs.sentences[{i}]" for i in range(n - 1))]


def similarity_response(out: list[np.ndarray]) -> list[float]:
    """(1 + n) vectors -> the cosine of each of the last n with the first (a zero vector's: 0)."""
    x = np.stack(out).astype(np.float64)
    return row_cosines(np.broadcast_to(x[:1], x[1:].shape), x[1:]).tolist()


def predict_request(body: dict[str, Any], limits: Limits) -> TeiRequest:
    """`inputs` as TEI reads it: a string, or a list of 1-2 strings, is one sequence (a pair: text, text_pair);
    a list of lists is a batch of them."""
    check_cut(body)
    if "inputs" not in body:
        raise ApiError(422, "missing field 'inputs' (a text, a [text, text_pair] list, or a list of those)",
                       param="inputs", code="missing")
    v = body["inputs"]
    batch = isinstance(v, list) and bool(v) and all(isinstance(x, list) for x in v)
    seqs = v if batch else [v]
    if v in ("", []):
        raise ApiError(422, "'inputs' is empty: send at least one text", param="inputs", code="empty_input")
    if len(seqs) > limits.max_inputs:
        raise ApiError(413, f"'inputs' has {len(seqs)} sequences; at most {limits.max_inputs} per request",
                       param="inputs", code="too_many_inputs")
    firsts, seconds = [], []
    for i, seq in enumerate(seqs):
        where, texts = f"inputs[{i}]" if batch else "inputs", [seq] if isinstance(seq, str) else seq
        if not isinstance(texts, list) or not 1 <= len(texts) <= 2 or not all(isinstance(t, str) for t in texts):
            raise ApiError(422, f"{where} must be a text or a [text, text_pair] list (a batch: a list of those)",
                           param="inputs", code="invalid_type")
        if not all(texts):
            raise ApiError(422, f"{where} holds an empty text", param="inputs", code="empty_input")
        firsts.append(texts[0])
        seconds.append(texts[1] if len(texts) == 2 else None)
    params = parameters_of(body)
    function = params.get("function_to_apply")
    if function is not None and (not isinstance(function, str) or function not in FUNCTIONS):
        raise ApiError(422, f"parameters.function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}",
                       param="parameters.function_to_apply", code="invalid_value")
    raw = boolean(body, "raw_scores", False)
    if raw and function not in (None, "none"):
        raise ApiError(422, f"raw_scores asks for the logits, parameters.function_to_apply for the {function}: send "
                            "one", param="raw_scores", code="invalid_value")
    top_k = integer({"parameters.top_k": params.get("top_k")}, "parameters.top_k", 1, 1 << 31, 0)
    return TeiRequest(firsts, not batch, boolean(body, "truncate"), raw_scores=raw, seconds=tuple(seconds),
                      function="none" if raw else function or "", top_k=top_k)


def predict_groups(req: TeiRequest) -> list[tuple[str | None, list[int]]]:
    """The sequences in runs of one kind: (None, the single texts' places), then (first text, the places of the
    pairs that open with it): a pair runs as (query, document) rows, one query a run."""
    groups: dict[str | None, list[int]] = {}
    for i, (a, b) in enumerate(zip(req.texts, req.seconds)):
        groups.setdefault(None if b is None else a, []).append(i)
    return list(groups.items())


def predict_response(out: list[np.ndarray], id2label: dict[int, str], req: TeiRequest,
                     problem_type: str = "") -> list[Any]:
    x = np.stack(out).astype(np.float64)                           # (n, labels) logits
    scores = FUNCTIONS[req.function](x) if req.function else label_scores(x, problem_type)
    items = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda k: -row[k])     # every label, best first (ties: label order)
        items.append([{"label": id2label.get(k, str(k)), "score": row[k]} for k in order[:req.top_k or None]])
    return items[0] if req.single else items


def info(name: str, model, cfg) -> dict[str, Any]:
    """TEI's GET /info: the model and the server's bounds (huggingface_hub's get_endpoint_info reads it)."""
    if model.task == "embed":
        kind: dict[str, Any] = {"embedding": {"pooling": model.meta.source.pooling.mode}}
    else:
        labels = {str(k): v for k, v in model.id2label.items()}
        kind = {"reranker" if len(labels) == 1 else "classifier": {
            "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}}
    return {"model_id": name, "model_sha": None, "model_dtype": model.variant, "model_type": kind,
            "prompts": model.encoder.prompts or None, "default_prompt_name": None,
            "max_concurrent_requests": cfg.max_queue,
            "max_input_length": model.max_length, "max_batch_tokens": cfg.max_batch_tokens,
            "max_batch_requests": cfg.max_batch, "max_client_batch_size": cfg.max_inputs,
            "auto_truncate": cfg.too_long != "reject", "tokenization_workers": 1, "version": __version__,
            "sha": None, "docker_label": None}

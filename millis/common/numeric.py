"""The small numeric rules every stage shares: softmax over logits, cosine between embeddings."""
from __future__ import annotations

import numpy as np

EPS = 1e-12  # a zero vector gets norm EPS, so its cosine is 0 rather than NaN


def softmax(x: np.ndarray) -> np.ndarray:
    """(..., C) logits -> probabilities over the last axis (shifted by the max: no overflow)."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) as e^-|x| / (1 + e^-|x|) below 0: no overflow at any x, and full relative precision for very
    negative logits (through tanh, 1 + tanh(x / 2) cancels: -38 and -45 both gave 0, a tie for a reranker)."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.result_type(x, np.float32), copy=False)


def label_scores(x: np.ndarray, problem_type: str = "") -> np.ndarray:
    """(N, labels) logits -> scores as HF's text-classification pipeline (and TEI) gives them, by the config's
    `problem_type`: a regression's raw values; a sigmoid per label for multi-label models and one-logit ones (a
    softmax over one label is always 1); else the softmax over the labels."""
    if problem_type == "regression":
        return np.asarray(x, dtype=np.float64)
    return sigmoid(x) if problem_type == "multi_label_classification" or x.shape[-1] == 1 else softmax(x)


RERANK_MAX_LABELS = 2  # a cross-encoder's head: one logit (relevance), or two (not relevant, relevant)


def not_a_reranker(labels: int, problem_type: str = "") -> str:
    """Why a sequence classifier of `labels` labels (config.json's `problem_type`) cannot rank (query, document)
    pairs, or "" where it can. A cross-encoder has one logit (ms-marco-MiniLM, bge-reranker) or two labels of one
    softmax (its last: relevant); of three or more (an NLI model, an intent classifier) no label is relevance:
    ranking by the last one's probability gave numbers that looked like relevance and were not. Two labels scored
    apart (multi-label, regression) are two answers, not one relevance either."""
    if labels == 1 or (labels == RERANK_MAX_LABELS and problem_type in ("", "single_label_classification")):
        return ""
    kind = f"a {problem_type} head of {labels} outputs" if labels == RERANK_MAX_LABELS else \
        f"a classifier of {labels} labels"
    return (f"is {kind}, not a cross-encoder: reranking reads a head of one logit (relevance) or two labels of one "
            f"softmax (not relevant, relevant)")


def relevance_scores(x: np.ndarray, raw: bool = False) -> np.ndarray:
    """(N, labels) logits of a cross-encoder -> (N,) relevance: the last label's score (label_scores: a one-logit
    model's sigmoid, else its probability), in 0..1; raw: its log-odds instead, the one logit itself or the last
    logit less the logsumexp of the others, which ranks as the score does (the last logit alone need not). A head of
    more labels is refused (not_a_reranker)."""
    x = np.asarray(x, dtype=np.float64)
    if why := not_a_reranker(x.shape[1]):
        raise ValueError(f"logits of shape {x.shape}: the model {why}")
    if not raw:
        return label_scores(x)[:, -1]
    if x.shape[1] == 1:
        return x[:, 0]
    rest = x[:, :-1]
    top = rest.max(1, keepdims=True)
    return x[:, -1] - (top[:, 0] + np.log(np.exp(rest - top).sum(1)))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> each row divided by its L2 norm."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D), (N, D) -> (N,): cosine of each row of a with the same row of b."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return (unit_rows(a) * unit_rows(b)).sum(-1)

"""Fidelity of a variant's outputs against the fp32 reference on the same texts."""
from __future__ import annotations

import numpy as np

from millis.common.numeric import relevance_scores, row_cosines
from millis.optimize.config import Budget


def compare(task: str, ref: np.ndarray, out: np.ndarray, group: int = 0) -> dict[str, float]:
    """ref/out: (N, D) outputs for the same N texts. A row with a NaN or an Inf (an fp16 overflow, ...) is
    `nonfinite_rows`, never within a budget; the other figures stay finite numbers (millis.json is JSON):
    such a row counts as a cosine of -1 and a disagreement, and the differences are the finite rows'.
    group: a reranker's rows, `group` documents a query in a row: top1_agreement is then the share of queries whose
    most relevant document is unchanged, and order_agreement the share of a query's document pairs kept in order,
    by the score /v1/rerank returns (a one-logit model's argmax over its one label would always agree)."""
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference {ref.shape}")
    bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    diff = np.abs(ref[~bad] - out[~bad])
    res = {"max_abs_diff": float(diff.max()) if diff.size else 0.0, "nonfinite_rows": int(bad.sum())}
    if task == "classify":
        res["max_logit_diff"] = res["max_abs_diff"]
        res["top1_agreement"] = float(((ref.argmax(-1) == np.nan_to_num(out).argmax(-1)) & ~bad).mean())
        if group:
            res.update(rank_agreement(ref, out, bad, group))
    else:
        cos = np.where(bad, -1.0, row_cosines(ref, np.where(bad[:, None], 0.0, out)))
        res["cos_min"], res["cos_mean"] = float(cos.min()), float(cos.mean())
        ref_norm, out_norm = np.linalg.norm(ref[~bad], axis=-1), np.linalg.norm(out[~bad], axis=-1)
        res["norm_ratio_off"] = float(np.abs(out_norm / np.maximum(ref_norm, 1e-12) - 1).max()) if len(ref_norm) else 0.0
    return res


RANK_TIE = 0.005  # two documents whose reference scores (0..1) are this close are a tie: either order keeps it


def rank_agreement(ref: np.ndarray, out: np.ndarray, bad: np.ndarray, group: int) -> dict[str, float]:
    """A reranker's rows grouped by query (`compare`): how far the variant keeps the reference's ranking. A query's
    top document is kept when the variant's pick scores within RANK_TIE of the best in the reference; a pair of
    documents is kept in order unless the reference tells them apart (by more than RANK_TIE) and the variant swaps
    them."""
    if not len(ref) or len(ref) % group:
        raise ValueError(f"{len(ref)} reranker rows are not whole groups of {group} documents a query")
    r = relevance_scores(ref).reshape(-1, group)
    o = relevance_scores(np.nan_to_num(out)).reshape(-1, group)
    broken = bad.reshape(-1, group).any(1)
    picked = np.take_along_axis(r, o.argmax(1)[:, None], 1)[:, 0]
    top1 = (picked >= r.max(1) - RANK_TIE) & ~broken
    i, j = np.triu_indices(group, 1)
    apart = np.abs(r[:, i] - r[:, j]) > RANK_TIE
    swapped = apart & (np.sign(r[:, i] - r[:, j]) != np.sign(o[:, i] - o[:, j]))
    return {"top1_agreement": float(top1.mean()), "order_agreement": float((~swapped & ~broken[:, None]).mean())}


HIGHER_IS_WORSE = ("max_abs_diff", "max_logit_diff", "norm_ratio_off", "nonfinite_rows")  # the rest: lower is worse


def worse(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Each figure of two fidelity results on the same texts (two batchings: judge.judged_batches) at its worse:
    the larger difference, the lower agreement or cosine."""
    pick = {k: max if k in HIGHER_IS_WORSE else min for k in a}
    return {k: pick[k](a[k], b[k]) if k in b else a[k] for k in a}


NORM_TOLERANCE = 0.1  # an embedding's length may be off by 10% (int8 moves it < 1%): the cosine alone passed a
# variant that dropped, doubled or rescaled the normalisation


def within(task: str, fid: dict[str, float], budget: Budget) -> tuple[bool, str]:
    """(ok, reason): does the variant keep the fidelity the budget asks for? (Written so that a NaN fails.)"""
    if fid.get("nonfinite_rows"):
        return False, f"{fid['nonfinite_rows']} output rows hold NaN or Inf"
    if task == "classify":
        if not fid["max_logit_diff"] <= budget.max_logit_diff:
            return False, f"max |dlogit| {fid['max_logit_diff']:.3g} > {budget.max_logit_diff}"
        if not fid["top1_agreement"] >= budget.min_top1_agreement:
            return False, f"top-1 agreement {fid['top1_agreement']:.3f} < {budget.min_top1_agreement}"
        if "order_agreement" in fid and not fid["order_agreement"] >= budget.min_order_agreement:  # a reranker's
            return False, f"order agreement {fid['order_agreement']:.3f} < {budget.min_order_agreement}"
        return True, "within budget"
    if not fid["cos_min"] >= budget.min_cosine:
        return False, f"cosine min {fid['cos_min']:.5f} < {budget.min_cosine}"
    if not fid.get("norm_ratio_off", 0.0) <= NORM_TOLERANCE:
        return False, f"embedding lengths off by up to {fid['norm_ratio_off']:.1%} (> {NORM_TOLERANCE:.0%})"
    return True, "within budget"

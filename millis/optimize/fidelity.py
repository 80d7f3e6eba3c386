"""Fidelity of a variant's outputs against the fp32 reference on the same texts."""
from __future__ import annotations

import numpy as np

from millis.common.numeric import row_cosines
from millis.optimize.config import Budget


def compare(task: str, ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """ref/out: (N, D) outputs for the same N texts."""
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference {ref.shape}")
    res = {"max_abs_diff": float(np.abs(ref - out).max())}
    if task == "classify":
        res["max_logit_diff"] = res["max_abs_diff"]
        res["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
    else:
        cos = row_cosines(ref, out)
        res["cos_min"], res["cos_mean"] = float(cos.min()), float(cos.mean())
    return res


def within(task: str, fid: dict[str, float], budget: Budget) -> tuple[bool, str]:
    """(ok, reason): does the variant keep the fidelity the budget asks for?"""
    if task == "classify":
        if fid["max_logit_diff"] > budget.max_logit_diff:
            return False, f"max |dlogit| {fid['max_logit_diff']:.3g} > {budget.max_logit_diff}"
        if fid["top1_agreement"] < budget.min_top1_agreement:
            return False, f"top-1 agreement {fid['top1_agreement']:.3f} < {budget.min_top1_agreement}"
        return True, "within budget"
    if fid["cos_min"] < budget.min_cosine:
        return False, f"cosine min {fid['cos_min']:.5f} < {budget.min_cosine}"
    return True, "within budget"

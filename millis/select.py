"""Stage 5: choose the fastest variant at the target shape that keeps the fidelity budget."""
from __future__ import annotations

from dataclasses import dataclass

from millis.errors import MillisError


@dataclass(frozen=True)
class Candidate:
    name: str
    p50_ms: float        # at the target shape
    ok: bool             # fidelity within budget
    reason: str = ""


def accuracy_gate(ref_accuracy: float, accuracy: float, max_drop: float) -> tuple[bool, str]:
    """(ok, reason): accuracies are fractions, `max_drop` is in points (0.5 = half a percent)."""
    drop = 100.0 * (ref_accuracy - accuracy)
    ok = drop <= max_drop + 1e-9  # equal counts as within
    return ok, f"accuracy drop {drop:.2f} pt {'within' if ok else 'exceeds'} --max-drop {max_drop}"


def select(candidates: list[Candidate]) -> Candidate:
    """Fastest candidate within budget; ties go to the earlier (simpler) one."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        raise MillisError("no variant meets the fidelity budget (not even the reference); "
                          "check the model and the --min-cosine / --max-logit-diff values")
    return min(ok, key=lambda c: c.p50_ms)

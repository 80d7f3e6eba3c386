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


def select(candidates: list[Candidate]) -> Candidate:
    """Fastest candidate within budget; ties go to the earlier (simpler) one."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        raise MillisError("no variant meets the fidelity budget (not even the reference); "
                          "check the model and the --min-cosine / --max-logit-diff values")
    return min(ok, key=lambda c: c.p50_ms)

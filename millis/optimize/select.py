"""Stage 5: choose the fastest variant at the target shape that keeps the fidelity budget and
serves: it does not stall on shapes it has not seen, and keeps up with the best on the serve mix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from millis.common.errors import MillisError


# p50s at the target within this share of the fastest are a tie (run-to-run noise on a shared CPU is
# about this size); a tie goes to the variant that serves more rows/s on the serve mix
NEAR_TIE = 0.05


@dataclass(frozen=True)
class Candidate:
    name: str
    p50_ms: float        # at the target shape
    ok: bool             # fidelity within budget, and serves (serve_gate below)
    reason: str = ""
    serve_rows_per_s: float = 0.0  # rows/s on the serve mix (0 = not measured)


def accuracy_gate(ref_accuracy: float, accuracy: float, max_drop: float) -> tuple[bool, str]:
    """(ok, reason): accuracies are fractions, `max_drop` is in points (0.5 = half a percent)."""
    drop = 100.0 * (ref_accuracy - accuracy)
    ok = drop <= max_drop + 1e-9  # equal counts as within
    return ok, f"accuracy drop {drop:.2f} pt {'within' if ok else 'exceeds'} --max-drop {max_drop}"


def serve_gate(mix: dict[str, dict[str, Any]], floor: float, stall_share: float) -> dict[str, str]:
    """{variant: why it is not selectable} among `mix` (the serve-mix results of the variants within
    budget, see millis.optimize.measure.serve_mix): it stalled on at least `stall_share` of the new shapes (a
    per-shape compile; one slow call is noise), or its rows/s over the mix is below `floor` x the
    best of those that do not stall."""
    def stalls(m: dict[str, Any]) -> bool:
        return len(m["stalls"]) >= stall_share * len(m["shapes"])

    best = max((m["rows_per_s"] for m in mix.values() if not stalls(m)), default=0.0)
    out = {}
    for name, m in mix.items():
        if stalls(m):
            s = m["stalls"][0]
            out[name] = (f"serve mix: stalls on {len(m['stalls'])} of {len(m['shapes'])} new shapes "
                         f"({s['shape']}: first call {s['cold_ms']:.0f} ms, then {s['warm_ms']:.1f} ms)")
        elif m["rows_per_s"] < floor * best:
            out[name] = (f"serve mix: {m['rows_per_s']:.1f} rows/s, {m['rows_per_s'] / best:.2f}x the best "
                         f"({best:.1f}); the floor is {floor}x")
    return out


def select(candidates: list[Candidate], near_tie: float = NEAR_TIE) -> Candidate:
    """Fastest candidate within budget at the target shape. Those within `near_tie` of the fastest p50
    tie: the one serving the most rows/s on the serve mix wins, then the faster, then the earlier."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        mix = [c for c in candidates if "serve mix" in c.reason]
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in mix)
        if mix and len(mix) == len(candidates):  # the reference passes the fidelity budget by definition
            raise MillisError(f"every variant was rejected on the serve mix (stalls on new shapes, or rows/s under "
                              f"the floor): {reasons}")
        raise MillisError("no variant meets the fidelity budget (not even the reference); check the model and "
                          "the --min-cosine / --max-logit-diff values" +
                          (f". Rejected on the serve mix: {reasons}" if reasons else ""))
    fastest = min(c.p50_ms for c in ok)
    tied = [c for c in ok if c.p50_ms <= fastest * (1 + near_tie)]
    return max(tied, key=lambda c: (c.serve_rows_per_s, -c.p50_ms))

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


def finer_than_a_row(max_drop: float, rows: int) -> str:
    """A warning when --max-drop is finer than one of `rows` selection rows (each is 100 / rows points): 0.5 on 100
    rows lets no row go wrong, as 0 would; "" when the budget is a whole number of rows' worth or 0 (asked for)."""
    if not rows or max_drop == 0 or abs(max_drop) >= 100.0 / rows:
        return ""
    return (f"--max-drop {max_drop} is finer than one selection row ({100.0 / rows:.2f} pt each of {rows} rows): "
            f"it lets {'no row go wrong' if max_drop > 0 else 'no fewer than one row more go right'} (more "
            f"labelled rows, or a budget of whole rows, say what you mean)")


def reference_fallback(rows: list[dict[str, Any]], chosen: str) -> str:
    """What to warn of when the fp32 reference ships because no optimized variant met the budget (`rows`: the
    variants' report rows, name / ok / reason / error); "" when an optimized variant was chosen, or one met the
    budget and the reference was merely faster."""
    from millis.optimize.build.variants import REFERENCE  # not at import: `millis report` reads this module

    others = [r for r in rows if r["name"] != REFERENCE]
    if chosen != REFERENCE or any(r.get("ok") for r in others):
        return ""
    why = "; ".join(f"{r['name']}: {r.get('error') or r.get('reason') or 'rejected'}" for r in others)
    return (f"no optimized variant met the budget ({why or 'none was tried'}); shipping the fp32 reference "
            f"{REFERENCE}")


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


FIDELITY_FLAGS = "--min-cosine / --max-logit-diff"  # the budget's flags, as select's error names them
ACCURACY_FLAGS = "--max-drop"                      # selecting on labelled rows


def select(candidates: list[Candidate], near_tie: float = NEAR_TIE, budget_flags: str = FIDELITY_FLAGS) -> Candidate:
    """Fastest candidate within budget at the target shape. Those within `near_tie` of the fastest p50
    tie: the one serving the most rows/s on the serve mix wins, then the faster, then the earlier.
    `budget_flags`: the flags of the gate that judged them (ACCURACY_FLAGS on labelled rows), for the error."""
    ok = [c for c in candidates if c.ok]
    if not ok:
        mix = [c for c in candidates if "serve mix" in c.reason]
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in mix)
        if mix and len(mix) == len(candidates):  # the reference passes the fidelity budget by definition
            raise MillisError(f"every variant was rejected on the serve mix (stalls on new shapes, or rows/s under "
                              f"the floor): {reasons}")
        gate = "accuracy" if budget_flags == ACCURACY_FLAGS else "fidelity"
        raise MillisError(f"no variant meets the {gate} budget (not even the reference); check the model and "
                          f"the {budget_flags} value{'s' if '/' in budget_flags else ''}" +
                          (f". Rejected on the serve mix: {reasons}" if reasons else ""))
    fastest = min(c.p50_ms for c in ok)
    tied = [c for c in ok if c.p50_ms <= fastest * (1 + near_tie)]
    return max(tied, key=lambda c: (c.serve_rows_per_s, -c.p50_ms))

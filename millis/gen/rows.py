"""One request never fails another: run a step's rows together, and when that raises, find the row.

`isolated` runs one request's part (its prefill); `per_row_on_error` runs a batched part (decode rows,
sampling) once, and only when it raises retries its rows one at a time, recording each failing
request's reason in `failed` (request id -> reason) so the engine ends that request alone."""
from __future__ import annotations

REASON_CHARS = 500  # a reason is the request's answer and a log line: some messages quote a whole grammar


def reason(e: Exception) -> str:
    """The reason recorded for a request that raised: its exception's type and message, cut short."""
    msg = str(e)
    return f"{type(e).__name__}: {msg if len(msg) <= REASON_CHARS else msg[:REASON_CHARS] + ' ...'}"


def isolated(failed: dict[str, str], r, fn):
    """fn() or, when it raises, None with the reason recorded for request r."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- one request's failure ends that request alone
        failed[r.id] = reason(e)
        return None


def per_row_on_error(items: list, fn, failed: dict[str, str], key=lambda r: r.id):
    """[(items, fn(items))] from one batched call; when it raises, [(one item, fn([item]))] for each
    item whose call succeeds alone, recording the reason of those that fail (keyed by request id)."""
    try:
        return [(items, fn(items))]
    except Exception as e:  # noqa: BLE001 -- find which row raised; the rest of the batch goes on
        if len(items) == 1:
            failed[key(items[0])] = reason(e)
            return []
    parts = []
    for it in items:
        try:
            parts.append(([it], fn([it])))
        except Exception as e:  # noqa: BLE001
            failed[key(it)] = reason(e)
    return parts

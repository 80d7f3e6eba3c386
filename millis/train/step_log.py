"""Training progress as plain lines, for output that is not a terminal (`millis train / distill / prune`
to a log file, and `millis optimize`'s compression step): a log file never shows a progress bar."""
from __future__ import annotations

import time


class StepLog:
    """Progress as plain lines, for output that is not a terminal (a log file sees no progress bar): a line
    each time an epoch passes another `every` of its steps, with loss, rate and the epoch's ETA."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.restart()

    def restart(self) -> None:
        self.t0, self.next = time.monotonic(), self.every

    def line(self, f: dict, total: int) -> str | None:
        done = f["step"] / max(total, 1)
        if done < self.next:
            return None
        self.next = (int(done / self.every + 1e-9) + 1) * self.every
        elapsed = time.monotonic() - self.t0
        eta = elapsed * (1 - done) / done if done > 0 else 0.0
        return (f"epoch {f['epoch']}: {100 * done:.0f}% ({f['step']}/{total} steps), loss {f['loss']:.4f}, "
                f"{f['rows_per_s']:.0f} rows/s, epoch ETA {eta:.0f} s")

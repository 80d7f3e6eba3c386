"""Is the machine quiet enough to trust a timing? What else ran while millis measured.

`snapshot()` before and after a measurement (`snapshot(pids)` where worker processes time on its behalf, as
bench/cpu_encoders.py's); `check(before, after, spreads)` says how much of the
CPUs other processes used meanwhile (all CPU time on the machine, from /proc/stat, minus this
process's own), the hypervisor's steal, and how far the timing rounds disagree, with a warning for
each past its limit. A ratio read off a loaded machine can be off by 2x (report.md's speed-up over
eager swung from 7.8x to 14.1x with the machine's load), so the warnings go in the report and the log.
"""
from __future__ import annotations

import os
import resource
import time

OTHER_LIMIT = 0.25   # share of the CPUs other processes may use while measuring before a warning
STEAL_LIMIT = 0.05   # share of CPU time the hypervisor may steal
SPREAD_LIMIT = 0.25  # slowest round's p50 over the fastest's, minus 1


def masked_cpus() -> set[int]:
    """The CPU numbers of this process's affinity mask (all of them where the OS has no masks)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _proc_stat(text: str | None = None, cpus: set[int] | None = None) -> tuple[float, float, float, int]:
    """(busy, steal, total) CPU seconds since boot summed over the masked CPUs' cpuN lines, and how many CPUs that
    is: the first line's whole-machine figures divided by the mask's size would count a 64-core host's load
    against 2 pinned CPUs. Zeros where /proc is absent. text / cpus: /proc/stat and the mask (tests)."""
    try:
        if text is None:
            with open("/proc/stat") as f:
                text = f.read()
        cpus = masked_cpus() if cpus is None else cpus
        rows = []
        for line in text.splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                rows.append([float(x) for x in fields])
    except (OSError, ValueError):
        return 0.0, 0.0, 0.0, 0
    hz = os.sysconf("SC_CLK_TCK")
    busy = steal = total = 0.0
    for v in rows:
        idle = v[3] + (v[4] if len(v) > 4 else 0.0)  # idle + iowait
        s = v[7] if len(v) > 7 else 0.0
        t = sum(v[:8])
        busy, steal, total = busy + t - idle - s, steal + s, total + t
    return busy / hz, steal / hz, total / hz, len(rows)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process `pid` has used; 0 where /proc has none of it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def snapshot(pids: tuple[int, ...] | list[int] = ()) -> dict:
    """pids: processes that measure on this one's behalf (a benchmark's workers): their CPU time counts as its
    own, not as other processes'. Each one's is kept apart (`workers`): one gone by the next snapshot (a peer
    that failed and was reaped) reads 0 there, and its lifetime must not count as other processes' load."""
    busy, steal, total, cpus = _proc_stat()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    workers = {str(p): process_cpu(p) for p in pids}
    return {"wall": time.monotonic(), "busy": busy, "steal": steal, "total": total,
            "own": ru.ru_utime + ru.ru_stime, "workers": workers, "cpus": cpus}


def own_used(before: dict, after: dict) -> float:
    """CPU seconds this process and its workers used between two snapshots; a worker gone by `after` (0 there:
    /proc has it no more) adds nothing, its time meanwhile unknown."""
    gone = lambda p: not after.get("workers", {}).get(p)  # noqa: E731
    return (after["own"] - before["own"]) + sum(max(0.0, after["workers"][p] - c)
                                                for p, c in before.get("workers", {}).items() if not gone(p))


def check(before: dict, after: dict, spreads: dict[str, float]) -> dict:
    """{other_share, steal_share, max_spread, warnings}: `spreads` is each timed cell's round spread."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    cpus = after.get("cpus") or len(masked_cpus())  # the CPUs whose counters "busy" sums
    other = min(1.0, max(0.0, (after["busy"] - before["busy"]) - own_used(before, after)) / (wall * cpus))
    total = after["total"] - before["total"]
    steal = (after["steal"] - before["steal"]) / total if total > 0 else 0.0
    worst = max(spreads.items(), key=lambda kv: kv[1], default=("", 0.0))
    # rounded once, here: the warnings and the report's sentence (which reads the rounded shares) say the same %
    other, steal, worst = round(other, 3), round(steal, 3), (worst[0], round(worst[1], 3))
    warnings = []
    if other > OTHER_LIMIT:
        warnings.append(f"other processes used {100 * other:.0f}% of the CPUs while millis measured: the timings "
                        f"(and the choice made from them) may not hold on a quiet machine")
    if steal > STEAL_LIMIT:
        warnings.append(f"the hypervisor took {100 * steal:.0f}% of the CPU time (steal) while millis measured")
    if worst[1] > SPREAD_LIMIT:
        warnings.append(f"timing rounds disagree: {worst[0]}'s slowest round is {100 * worst[1]:.0f}% over its "
                        f"fastest")
    return {"other_share": other, "steal_share": steal, "max_spread": worst[1], "warnings": warnings}

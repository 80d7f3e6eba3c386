"""The share of the CPUs other processes used counts only the CPUs this process may run on."""
import os

from millis.common import machine_load

HZ = os.sysconf("SC_CLK_TCK")


def stat(rows: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat with cpuN lines of (busy user ticks, idle ticks) and the whole-machine line first."""
    user, idle = sum(b for b, _ in rows.values()), sum(i for _, i in rows.values())
    lines = [f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0"] + [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (b, i) in rows.items()]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 5"]) + "\n"


def test_only_the_masked_cpus_count():
    # a 4-CPU host: CPUs 2 and 3 fully busy with someone else's work, this process pinned to 0 and 1 (idle)
    before = stat({0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)})
    after = stat({0: (0, HZ), 1: (0, HZ), 2: (HZ, 0), 3: (HZ, 0)})
    snaps = []
    for text in (before, after):
        busy, steal, total, cpus = machine_load._proc_stat(text, {0, 1})
        snaps.append({"wall": float(len(snaps)), "busy": busy, "steal": steal, "total": total, "own": 0.0,
                      "cpus": cpus})
    assert snaps[1]["cpus"] == 2 and snaps[1]["busy"] == 0.0 and snaps[1]["total"] == 2.0
    got = machine_load.check(snaps[0], snaps[1], {})
    assert got["other_share"] == 0.0 and not got["warnings"]  # the whole-machine line said 100% of 2 CPUs
    busy, _, total, cpus = machine_load._proc_stat(after, {2, 3})
    assert (busy, total, cpus) == (2.0, 2.0, 2)


def test_snapshot_reads_this_machine():
    snap = machine_load.snapshot()
    assert snap["cpus"] == len(machine_load.masked_cpus()) and snap["total"] > 0


def test_a_worker_gone_by_the_second_snapshot_is_not_other_load():
    """A peer that burned 1.5 s preparing, then failed and was reaped: its lifetime counted as other processes'
    load (102% of the CPUs on an idle machine)."""
    before = {"wall": 0.0, "busy": 10.0, "steal": 0.0, "total": 100.0, "own": 1.0, "workers": {"77": 1.5},
              "cpus": 2}
    after = {"wall": 2.0, "busy": 10.1, "steal": 0.0, "total": 104.0, "own": 1.1, "workers": {"77": 0.0}, "cpus": 2}
    got = machine_load.check(before, after, {})
    assert got["other_share"] == 0.0 and not got["warnings"], got
    after = {**after, "busy": 12.0, "workers": {"77": 3.4}}  # alive: its 1.9 s are this measurement's own
    assert machine_load.check(before, after, {})["other_share"] == 0.0
    after = {**after, "busy": 30.0}  # a busy neighbour: at most all of the CPUs, whatever the counters say
    assert machine_load.check(before, after, {})["other_share"] == 1.0

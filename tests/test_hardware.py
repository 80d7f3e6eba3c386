"""Hardware detection within cgroup limits: fake /proc and /sys/fs/cgroup trees under a root directory."""
from pathlib import Path

from millis.common import hardware

GiB = 1 << 30
MEMINFO = "MemTotal:       65536000 kB\nMemFree:        1000 kB\nMemAvailable:   33554432 kB\n"  # 32 GiB


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_cgroup_v2_cpu_quota_and_memory(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/box\n", "proc/meminfo": MEMINFO,
                           "sys/fs/cgroup/box/cpu.max": "150000 100000\n",  # 1.5 CPUs: 2 threads
                           "sys/fs/cgroup/box/memory.max": str(4 * GiB), "sys/fs/cgroup/box/memory.current": str(GiB),
                           "sys/fs/cgroup/box/memory.stat": f"anon 1\ninactive_file {GiB // 2}\n",
                           "sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert hardware.cgroup_cpus(root) == 2
    assert hardware.usable_cpus(root) == min(2, hardware.usable_cpus(tmp_path / "none"))
    assert hardware.available_memory(root) == 4 * GiB - GiB // 2  # limit - (usage - reclaimable cache)
    (root / "sys/fs/cgroup/memory.max").write_text(str(2 * GiB))  # a tighter parent binds too
    (root / "sys/fs/cgroup/memory.current").write_text(str(GiB))
    assert hardware.available_memory(root) == GiB


def test_cgroup_v1_quota_and_limit(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "4:memory:/\n1:cpu,cpuacct:/\n", "proc/meminfo": MEMINFO,
                           "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
                           "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                           "sys/fs/cgroup/memory/memory.limit_in_bytes": str(3 * GiB),
                           "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB)})
    assert hardware.cgroup_cpus(root) == 1 and hardware.usable_cpus(root) == 1
    assert hardware.available_memory(root) == 2 * GiB


def test_no_limits_keep_the_machine_figures(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "0::/\n", "proc/meminfo": MEMINFO,
                           "sys/fs/cgroup/cpu.max": "max 100000\n", "sys/fs/cgroup/memory.max": "max\n",
                           "sys/fs/cgroup/memory.current": "123\n",
                           "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "1\n"})
    assert hardware.cgroup_cpus(root) is None and hardware.cgroup_memory(root) is None
    assert hardware.available_memory(root) == 32 * GiB
    assert hardware.available_memory(tmp_path / "nothing") == 4 * GiB  # nothing known: the fallback

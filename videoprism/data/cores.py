"""The cores this process may run on (what worker counts are sized by) and the memory it may still take (what
a command that holds data on the host checks before it decodes).

`os.cpu_count()` counts the machine's cores, not the ones a scheduler gave the job: under SLURM's
--cpus-per-task=4 (or taskset, or a container's cpuset) on a 128-core node it says 128, and a data index or
synth sized by it started 128 processes on 4 cores. The affinity mask is the job's share."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The number of cores in this process's affinity mask (the machine's count where the OS has no mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes the host can still give this process without swapping (Linux's MemAvailable, or the headroom under a
    cgroup v2 memory limit when less); None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            have = min(have, int(limit) - used)
    except (OSError, ValueError):
        pass
    return have

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


# Where available_memory reads (a test points them at files of its own).
MEMINFO, CGROUP = "/proc/meminfo", "/sys/fs/cgroup"


def available_memory() -> int | None:
    """Bytes the host can still give this process without swapping (Linux's MemAvailable, or the headroom under a
    cgroup v2 memory limit when less); None where it cannot tell."""
    try:
        with open(MEMINFO) as f:
            have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        with open(os.path.join(CGROUP, "memory.max")) as f, open(os.path.join(CGROUP, "memory.current")) as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max":
            have = min(have, max(0, int(limit) - used + _cgroup_reclaimable()))
    except (OSError, ValueError):
        pass
    return have


def _cgroup_reclaimable() -> int:
    """The cgroup's inactive page cache (memory.stat's inactive_file; 0 where unread): memory.current counts the
    files read through it (the videos, the checkpoint), which the kernel drops before it runs out, as MemAvailable
    counts them free. Without it a container whose page cache had filled up to its limit read as full."""
    try:
        with open(os.path.join(CGROUP, "memory.stat")) as f:
            return next((int(line.split()[1]) for line in f if line.startswith("inactive_file ")), 0)
    except (OSError, ValueError, IndexError):
        return 0

"""The cores this process may run on: what worker counts are sized by.

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

"""What this process may use of the host."""
from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on: a container's --cpuset-cpus, taskset, ... (os.cpu_count() sees them all,
    and thread pools sized by it oversubscribe a container)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

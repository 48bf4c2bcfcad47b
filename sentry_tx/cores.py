# -*- test-case-name: tests.test_cores,tests.test_tap -*-
"""
How many processes serve gRPC by default: one per core this process may use,
at most L{MAX_DEFAULT_SERVING_PROCESSES}.

The cores usable are the cgroup v2 CPU quota (C{cpu.max} of this process's
cgroup and of each of its ancestors, the smallest), else the CPU affinity
mask.  Dapr's chart sets no CPU limit, so on a large node the cap is what
bounds memory.
"""

import math
import os
from collections.abc import Callable, Set

MAX_DEFAULT_SERVING_PROCESSES = 4
"""
The most serving processes chosen by default (C{--workers} may ask for
more).
"""

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"

_MAX_CGROUP_FILE_BYTES = 4096


def _read_small_file(path: str) -> str | None:
    """
    The text of a small kernel file (cgroupfs, procfs), or None when it
    cannot be read.  Opened non-blocking and read once, up to 4 KiB.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, _MAX_CGROUP_FILE_BYTES).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def cgroup_path(proc_self_cgroup: str = PROC_SELF_CGROUP) -> str | None:
    """
    This process's cgroup v2 path (C{/} in a container with its own cgroup
    namespace), or None when there is no unified hierarchy entry.
    """
    text = _read_small_file(proc_self_cgroup)
    if text is None:
        return None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path or "/"
    return None


def parse_cpu_max(text: str) -> float | None:
    """
    The number of CPUs a C{cpu.max} line allows (C{"200000 100000"} is 2.0),
    or None for no limit (C{"max ..."}) or a line that does not parse.
    """
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_limit(
    cgroup_root: str = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP
) -> float | None:
    """
    The smallest CPU quota of this process's cgroup and its ancestors, in
    CPUs, or None when none is set.
    """
    path = cgroup_path(proc_self_cgroup)
    if path is None:
        return None
    limits: list[float] = []
    parts = [part for part in path.split("/") if part]
    for depth in range(len(parts), -1, -1):
        directory = os.path.join(cgroup_root, *parts[:depth])
        text = _read_small_file(os.path.join(directory, "cpu.max"))
        if text is not None:
            limit = parse_cpu_max(text)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def usable_cores(
    cgroup_root: str = CGROUP_ROOT,
    proc_self_cgroup: str = PROC_SELF_CGROUP,
    affinity: Callable[[], Set[int]] = lambda: os.sched_getaffinity(0),
) -> tuple[int, str]:
    """
    How many cores this process may use, and why.

    @return: C{(count, reason)}, count at least 1; a fractional quota is
        rounded up (a quota of 1.5 CPUs is worth two processes' bursts).
    """
    limit = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    cpus = len(affinity())
    if limit is not None:
        count = max(1, min(math.ceil(limit), cpus))
        return count, f"cgroup CPU quota of {limit:g} CPUs"
    return max(1, cpus), f"CPU affinity of {cpus} CPUs (no cgroup CPU quota)"


def default_serving_processes(
    cgroup_root: str = CGROUP_ROOT,
    proc_self_cgroup: str = PROC_SELF_CGROUP,
    affinity: Callable[[], Set[int]] = lambda: os.sched_getaffinity(0),
) -> tuple[int, str]:
    """
    The default number of serving processes (this one included), and why.

    @return: C{(count, reason)}.
    """
    cores, reason = usable_cores(cgroup_root, proc_self_cgroup, affinity)
    if cores > MAX_DEFAULT_SERVING_PROCESSES:
        return (
            MAX_DEFAULT_SERVING_PROCESSES,
            f"{reason}, capped at {MAX_DEFAULT_SERVING_PROCESSES}",
        )
    return cores, reason

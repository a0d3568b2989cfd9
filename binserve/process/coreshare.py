"""How many compute threads a batch may use: the cores this process may use, split between the batches
running now.

design: on a small CPU, one worker computing with every core gives a lone request the lowest
latency, but two workers computing at once, each with every core, oversubscribe the cores, and a
single worker whose threads share the cores with HTTP work stalls at every barrier. Measured on
the project's 2-core machine (bench/RESULTS.md): two workers with one thread each served ~25% more
requests under load than one worker with two threads, and a lone request ~25% slower. So the cores
are shared: a batch that starts while no other worker computes takes all of them; one that starts
beside others takes its share. The slots live in shared memory that the Gunicorn master creates
before it forks (`create`), one per worker, so a worker that dies mid-batch is cleared by the
master (`clear`) instead of holding its share for ever. Without Gunicorn (tests, one process)
there is one slot and the count is local. This module imports neither torch nor prometheus_client:
the master loads it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import threading
from pathlib import Path


def worker_count(configured: int) -> int:
    """Gunicorn workers for the `workers` setting; 0: two on two or more usable cores (measured best:
    bench/RESULTS.md), else one."""
    return configured or min(2, usable_cores())


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs this process's cgroup may use by its CFS quota (a container's CPU limit); None if unlimited.

    cgroup v2: `cpu.max` ("<quota> <period>" or "max <period>") of this process's cgroup and its
    ancestors, the smallest; cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` of the cpu
    controller's group (-1: unlimited). A container usually sees its own cgroup as the root.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    limits = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy: walk up from the process's group
            group = Path(root, rel)
            while True:
                limits.append(_quota_v2(group / "cpu.max"))
                if group == Path(root) or Path(root) not in group.parents:
                    break
                group = group.parent
        elif "cpu" in controllers.split(","):
            for base in (Path(root, controllers), Path(root, "cpu"), Path(root, "cpu,cpuacct")):
                if base.is_dir():
                    limits.append(_quota_v1(base / rel))
                    break
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def _quota_v2(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(group: Path) -> float | None:
    try:
        quota = int((group / "cpu.cfs_quota_us").read_text())
        period = int((group / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cores() -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup CPU quota (a container's
    limit), rounded up. A 2-CPU pod on a 64-core node is 2, not 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


_SLOTS = 64  # workers per host that can be told apart; more share slots (and count as one)
_shared = None  # (RawArray of busy flags, Lock), made in the master before the fork
_local_lock = threading.Lock()
_local_busy = [0]


def create() -> None:
    """In the Gunicorn master, before workers fork: the shared slots every worker will see."""
    global _shared
    _shared = (multiprocessing.RawArray("i", _SLOTS), multiprocessing.Lock())


def clear(worker_index: int) -> None:
    """In the master, when a worker exits: it computes nothing any more."""
    if _shared is not None:
        flags, lock = _shared
        with lock:
            flags[worker_index % _SLOTS] = 0


@contextlib.contextmanager
def share(cores: int, worker_index: int):
    """Mark this worker's batch as running while the block runs; yields the threads it may use."""
    if _shared is None:
        with _local_lock:
            _local_busy[0] += 1
            active = _local_busy[0]
        try:
            yield max(1, cores // active)
        finally:
            with _local_lock:
                _local_busy[0] -= 1
        return
    flags, lock = _shared
    slot = worker_index % _SLOTS
    with lock:
        flags[slot] += 1
        active = sum(1 for f in flags if f)
    try:
        yield max(1, cores // active)
    finally:
        with lock:
            flags[slot] = max(0, flags[slot] - 1)

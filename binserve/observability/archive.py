"""Keeps prometheus_client's multiprocess directory bounded: a dead worker's files are folded into archives.

design: in multiprocess mode every worker writes `counter_<pid>.db`, `histogram_<pid>.db` and
gauge files, and a scrape sums them all. `mark_process_dead` removes only a dead worker's live
gauges, so every restarted worker leaves its counter and histogram files behind for ever
(prometheus_client issue #568): the directory grows with every restart and scrapes read more
files each time. When a worker exits, the Gunicorn master adds that worker's counter and
histogram values into `counter_archive.db` / `histogram_archive.db` (the collector sums those like
any other file, so no total goes backwards) and removes the worker's files. Only the master
writes the archives. This module defines no metric, so importing it in the master creates no file.
"""

from __future__ import annotations

import glob
import os

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

#: the metric types whose values must survive their process (gauges are per live process)
ARCHIVED_KINDS = ("counter", "histogram", "summary")


def ensure_directory() -> str | None:
    """Create PROMETHEUS_MULTIPROC_DIR if it is set and missing; returns it (None when unset)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
    return path


def archive_dead_process(pid: int, path: str | None = None) -> None:
    """Fold the counters and histograms of exited process `pid` into the archives; remove its files."""
    path = path or os.environ["PROMETHEUS_MULTIPROC_DIR"]
    multiprocess.mark_process_dead(pid, path)  # its live gauges
    for kind in ARCHIVED_KINDS:
        dead = os.path.join(path, f"{kind}_{pid}.db")
        if not os.path.exists(dead):
            continue
        archive = MmapedDict(os.path.join(path, f"{kind}_archive.db"))
        try:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):
                total, _ = archive.read_value(key)
                archive.write_value(key, total + value, timestamp)
        finally:
            archive.close()
        os.remove(dead)
    for leftover in glob.glob(os.path.join(path, f"gauge_*_{pid}.db")):
        os.remove(leftover)  # other gauge modes mean nothing once the process is gone

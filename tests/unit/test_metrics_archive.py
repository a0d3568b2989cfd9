"""The multiprocess metrics directory stays bounded when processes die, and no total goes backwards.

Real processes write real prometheus_client files (a counter, a histogram and a live gauge); after
each one exits, its files are archived as the Gunicorn master does in `child_exit`.
"""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from binserve.observability import archive

WRITER = """
from prometheus_client import Counter, Gauge, Histogram
Counter("jobs_total", "jobs", ["kind"]).labels("a").inc(3)
Histogram("job_seconds", "time", buckets=(0.1, 1.0)).observe(0.5)
Gauge("busy", "busy", multiprocess_mode="livesum").set(1)
"""


def scrape(path: str) -> dict:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_ten_dead_processes_leave_two_archive_files_and_their_totals(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    totals = []
    for _ in range(10):
        proc = subprocess.run([sys.executable, "-c", WRITER], env=env, check=True)
        assert proc.returncode == 0
        pids = {int(f.stem.rsplit("_", 1)[1]) for f in tmp_path.glob("*.db") if not f.stem.endswith("archive")}
        for pid in pids:
            archive.archive_dead_process(pid, str(tmp_path))
        sample = scrape(str(tmp_path))
        totals.append(sample[("jobs_total", (("kind", "a"),))])
        assert sample[("job_seconds_count", ())] == totals[-1] / 3
        assert sample[("job_seconds_bucket", (("le", "1.0"),))] == totals[-1] / 3
        assert sample.get(("busy", ()), 0) == 0  # a dead process is busy with nothing
    assert totals == [3.0 * (i + 1) for i in range(10)]  # never backwards, nothing lost
    assert sorted(f.name for f in tmp_path.iterdir()) == ["counter_archive.db", "histogram_archive.db"]


def test_the_directory_is_created_when_missing(tmp_path, monkeypatch):
    missing = tmp_path / "not" / "yet"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(missing))
    assert archive.ensure_directory() == str(missing) and missing.is_dir()
    proc = subprocess.run(
        [sys.executable, "-c", "from binserve.observability import metrics"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "fresh")},
        cwd=os.getcwd(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr  # `python server.py` imports metrics before Gunicorn starts

"""A short headless Locust run against real Gunicorn: zero failures and a minimum request count."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import MODELS
from tests.serverproc import ROOT, ServerProcess

ARTIFACTS = Path(os.environ.get("BINSERVE_ARTIFACTS", ROOT / "artifacts"))


def test_headless_locust_run_has_no_failures():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    prefix = ARTIFACTS / "locust"
    with ServerProcess(workers=2, models=MODELS) as srv:
        env = {**os.environ, "BINSERVE_LOCUST_ARRAY_MODEL": "policy"}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(ROOT / "locustfile.py"),
                "--headless",
                "-u",
                "16",
                "-r",
                "16",
                "-t",
                "15s",
                "--host",
                srv.base_url,
                "--csv",
                str(prefix),
                "--only-summary",
                "--stop-timeout",
                "10",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0, (ARTIFACTS / "locust_failures.csv").read_text()
    assert int(total["Request Count"]) >= 100
    assert {"texts", "token ids", "arrays"} <= set(rows), sorted(rows)

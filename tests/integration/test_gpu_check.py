"""bench/gpu_check.sh --cpu-dry-run: the GPU check's every step, on the CPU with tiny models, so the
script cannot rot between GPU leases (bench/gpu_bench.sh, which it replaces, had: it called the
bench client with arguments the client no longer took)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.serverproc import ROOT

pytestmark = pytest.mark.slow
PHASES = ("build", "tests", "raw", "server", "overlap", "generation")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINSERVE_")}
    r = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-dry-run"],
        cwd=ROOT, env=env | {"OUT": str(out), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return r, out


def test_every_phase_runs_and_the_summary_holds_its_figures(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"] == dict.fromkeys(PHASES, "ok")
    assert summary["machine"]["mode"] == "dry" and summary["machine"]["torch"]
    figures = summary["figures"]
    # the GPU tests are collected and (on a CPU) every one skipped; the CPU cases of the unit file pass
    tests = figures["tests"]
    assert tests["failures"] == tests["errors"] == 0 and tests["passed"] >= 4 and tests["skipped"] >= 8
    for model, sizes in (("encoder", ["1", "2", "4"]), ("images", ["1", "2"])):
        for precision in ("fp32", "bf16"):
            engine = figures["raw"][model][precision]
            assert sorted(engine["seq_per_s"]) == sizes and min(engine["seq_per_s"].values()) > 0
            assert engine["passes_gate"], engine["accuracy"]
    runs = [*figures["server"]["encoder"].values(), *figures["server"]["images"].values(),
            *figures["overlap"]["server"].values()]  # fmt: skip
    assert len(runs) == 7 and all(x["requests"] > 0 and x["failures"] == x["wrong"] == 0 for x in runs)
    generation = figures["generation"]
    assert set(generation["server"]) == {"1", "8", "32"} and set(generation["static"]) == {"1", "8"}
    names = [t["target"] for t in summary["targets"]]
    assert len(names) == 6 and all(t["met"] is None for t in summary["targets"])  # a CPU judges nothing
    assert "failed requests" in names and any(n.startswith("encoder server c=8") for n in names)


def test_the_logs_come_back_and_no_server_is_left_running(dry_run):
    _, out = dry_run
    assert "== report" in (out / "check.log").read_text()
    assert "Booting worker" in (out / "servers.log").read_text()  # Gunicorn's own log, one per server
    assert (out / "pytest.xml").is_file()
    left = subprocess.run(["pgrep", "-f", "binserve-gpucheck"], capture_output=True, text=True).stdout.split()
    assert left == [], left

"""The GPU check's report and wheel choice, on hand-made phase results (no GPU, no server)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from bench.gpu_check import wheels_needed
from bench.gpu_report import report, targets


def engines(fp32: dict, bf16: dict, bf16_passes: bool = True) -> dict:
    return {
        "fp32": {"seq_per_s": fp32, "passes_gate": True, "accuracy": "exact"},
        "bf16": {"seq_per_s": bf16, "passes_gate": bf16_passes, "accuracy": "cosine 0.9999"},
    }


def run(rps: float, batch: float, failures: int = 0, wrong: int = 0, first: str = "") -> dict:
    return {"req/s": rps, "p50": 1.0, "p99": 2.0, "batch": batch, "gpu_util": 50.0, "failures": failures,
            "wrong": wrong, "first_failure": first, "requests": 100}  # fmt: skip


PHASES = {
    "raw": {
        # JSON keys: batch sizes as strings, as the phases' files hold them
        "encoder": engines({"1": 100, "16": 800, "32": 1000}, {"1": 150, "16": 1200, "32": 1600}),
        "images": engines({"1": 10, "64": 100}, {"1": 12, "64": 140}),
    },
    "server": {
        "encoder": {"1": run(90, 1.0), "128": run(1300, 26.0)},  # 26 is nearer 32 than 16 (by ratio)
        "images": {"1": run(9, 1.0), "32": run(80, 20.0, failures=1, first="503 draining")},
    },
    "overlap": {"server": {"pinned": run(130, 8.0), "pageable": run(100, 8.0)}, "concurrency": 32,
                "in_process": {"pinned": {"64": 120}, "pageable": {"64": 100}}},  # fmt: skip
}


def test_each_target_is_computed_and_judged():
    got = {t["target"]: t for t in targets(PHASES)}
    server = got["encoder server c=128 / raw at its batch"]
    assert server["value"] == pytest.approx(1300 / 1600) and server["met"] is True  # bf16 at b=32 is the best
    assert got["encoder raw bf16 / fp32 at batch 32"]["met"] is True
    images = got["images raw bf16 / fp32 at batch 64"]
    assert images["value"] == pytest.approx(1.4) and images["met"] is False
    overlap = got["images, pinned + streams / pageable, server c=32"]
    assert overlap["value"] == pytest.approx(1.3) and overlap["met"] is True and "1.20x" in overlap["note"]
    failed = got["failed requests"]
    assert failed["value"] == 1 and failed["met"] is False and failed["note"] == "503 draining"
    assert got["replies outside the accuracy gate"]["met"] is True


def test_an_engine_that_fails_its_gate_is_not_the_raw_rate_the_server_is_held_to():
    phases = json.loads(json.dumps(PHASES))
    phases["raw"]["encoder"]["bf16"]["passes_gate"] = False
    server = next(t for t in targets(phases) if t["target"].startswith("encoder server"))
    assert server["value"] == pytest.approx(1.3) and "fp32" in server["note"]


def test_the_report_says_how_each_phase_ended(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "phase-build.rc").write_text("0\n")
    (work / "models.json").write_text("{}")
    (work / "phase-raw.rc").write_text("0\n")
    (work / "phase-raw.json").write_text(json.dumps({"status": "ok", **PHASES["raw"]}))
    (work / "phase-tests.rc").write_text("1\n")
    (work / "phase-tests.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError('CUDA error')"}))
    (work / "phase-server.rc").write_text("124\n")  # cut by `timeout`
    assert report("gpu", work, out) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"] == {
        "build": "ok", "tests": "failed: RuntimeError('CUDA error')", "raw": "ok", "server": "timed out",
        "overlap": "not run", "generation": "not run",
    }  # fmt: skip
    assert [t["target"] for t in summary["targets"]] == [
        "encoder raw bf16 / fp32 at batch 32", "images raw bf16 / fp32 at batch 64",
    ]  # fmt: skip
    assert set(summary["figures"]) == {"raw"}


def test_only_wheels_missing_or_at_another_version_are_installed(tmp_path):
    have = metadata.version("flask")
    for name in (f"flask-{have}-py3-none-any.whl", "werkzeug-0.0.1-py3-none-any.whl",
                 "no_such_package-1.0-py3-none-any.whl"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert [p.split("/")[-1] for p in wheels_needed(tmp_path)] == [
        "no_such_package-1.0-py3-none-any.whl", "werkzeug-0.0.1-py3-none-any.whl",
    ]  # fmt: skip

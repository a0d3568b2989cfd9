"""The admin surface on real Gunicorn: the admin token is not a shell, workers recover, replicas and
concurrent reloads, a bounded metrics directory, and the admin port. The policy model loads in a
second, so these servers start fast."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from request_tools import InferenceClient
from tests.serverproc import ServerProcess, free_port, poll

ADMIN = "admin-secret"
POLICY = "policy=torch_module:models/policy_v1"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
SAMPLE = {"image": np.zeros((480, 640, 3), np.uint8), "state": np.zeros(6, np.float32)}


def update(base_url: str, timeout: float = 120, **body) -> requests.Response:
    return requests.post(f"{base_url}/update_model", json={"model": "policy", **body}, headers=HEADERS, timeout=timeout)


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> Path:
    """The import root: a good policy copy, one naming a command as its class, one with a symlink."""
    root = tmp_path_factory.mktemp("imports")
    shutil.copytree("models/policy_v1", root / "good")
    evil = root / "evil"
    shutil.copytree("models/policy_v1", evil)
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest.update({"class": "subprocess:call", "init_args": {"args": ["touch", str(root / "ran")]}})
    (evil / "manifest.json").write_text(json.dumps(manifest))
    linked = root / "linked"
    shutil.copytree("models/policy_v1", linked)
    (linked / "etc").symlink_to("/etc")
    return root


@pytest.fixture(scope="module")
def admin_server(imports):
    with ServerProcess(workers=2, models=POLICY, admin_token=ADMIN, import_root=imports, repository_poll_ms=200) as srv:
        yield srv


def repo_leftovers(srv) -> list[str]:
    return sorted(p.name for p in (srv.repository / "policy").iterdir() if p.name.startswith(".import-"))


def test_a_manifest_naming_a_command_is_refused_before_it_runs(admin_server, imports):
    versions_before = sorted(p.name for p in (admin_server.repository / "policy").iterdir() if p.name.isdigit())
    r = update(admin_server.base_url, path=str(imports / "evil"))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "'subprocess:call' is refused" in message and "trusted packages ['models']" in message
    assert not (imports / "ran").exists(), "the admin token ran a command"
    versions_after = sorted(p.name for p in (admin_server.repository / "policy").iterdir() if p.name.isdigit())
    assert versions_after == versions_before and repo_leftovers(admin_server) == []


def test_symlinked_imports_are_refused_and_leave_nothing(admin_server, imports):
    r = update(admin_server.base_url, path=str(imports / "linked"))
    assert r.status_code == 400 and "is a symlink" in r.json()["error"]["message"], r.text
    r = update(admin_server.base_url, path="/etc")
    assert r.status_code == 400 and "not a directory under the import root" in r.json()["error"]["message"]
    assert repo_leftovers(admin_server) == []
    assert not any((admin_server.repository / "policy").rglob("shadow"))


def test_three_concurrent_reloads_answer_within_seconds(admin_server, imports):
    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: update(admin_server.base_url, path=str(imports / "good")), range(3)))
    elapsed = time.monotonic() - t0
    statuses = sorted(r.status_code for r in replies)
    assert all(s in (200, 409) for s in statuses) and 200 in statuses, [r.text for r in replies]
    for r in replies:
        if r.status_code == 409:
            assert r.json()["error"]["type"] == "superseded" and "superseded by version" in r.json()["error"]["message"]
    assert elapsed < 60, f"three reloads took {elapsed:.0f}s"  # the reload timeout is 120 s: none waited it out
    final = max(int(r.json()["version"]) for r in replies if r.status_code == 200)
    assert (admin_server.repository / "policy" / "CURRENT").read_text().strip() == str(final)
    info = poll(lambda: requests.get(f"{admin_server.base_url}/models", timeout=10).json())
    assert set(info["models"][0]["workers"].values()) <= {str(final)}


def test_path_imports_are_off_without_an_import_root():
    with ServerProcess(workers=1, models=POLICY, admin_token=ADMIN) as srv:
        r = update(srv.base_url, path="/tmp")
        assert r.status_code == 403 and "path imports are off" in r.json()["error"]["message"]
        assert update(srv.base_url, version="1").status_code == 200  # naming a version still works


def test_a_worker_recovers_when_the_repository_is_fixed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "policy" / "1").mkdir(parents=True)
    manifest = {"adapter": "torch_module", "path": str(Path("models/policy_v1").resolve())}
    (repo / "policy" / "1" / "binserve.json").write_text(json.dumps(manifest))
    (repo / "policy" / "CURRENT").write_text("7\n")  # a version that does not exist
    srv = ServerProcess(workers=1, models=POLICY, model_repository=repo).start(wait=False)
    try:
        status = srv.wait_failed()
        assert "version 7" in status["models"]["policy"] and "retrying" in status["models"]["policy"]
        health = requests.get(f"{srv.base_url}/healthz", timeout=5)
        assert health.status_code == 200  # alive: a restart would not fix the repository
        r = requests.post(f"{srv.base_url}/infer/policy", data=b"", timeout=5)
        assert r.status_code == 503 and "not loaded" in r.json()["error"]["message"]
        tmp = repo / "policy" / ".CURRENT.new"
        tmp.write_text("1\n")
        os.replace(tmp, repo / "policy" / "CURRENT")  # the operator fixes the repository
        poll(lambda: requests.get(f"{srv.base_url}/readyz", timeout=5).status_code == 200, timeout_s=60)
        assert requests.get(f"{srv.base_url}/healthz", timeout=5).json()["pid"] == health.json()["pid"]  # no restart
        out = InferenceClient(srv.base_url).infer(SAMPLE, model="policy")
        assert out["action"].shape == (2,)
    finally:
        srv.stop()


def test_two_replicas_on_one_repository_keep_their_reports(tmp_path):
    repo = tmp_path / "shared"
    a = ServerProcess(workers=1, models=POLICY, model_repository=repo, replica_id="pod-a", admin_token=ADMIN)
    b = ServerProcess(workers=1, models=POLICY, model_repository=repo, replica_id="pod-b", repository_poll_ms=200)
    with a, b:
        workers = poll(
            lambda: (w := requests.get(f"{a.base_url}/models", timeout=10).json()["models"][0]["workers"])
            and len(w) == 2
            and w
        )
        assert sorted(w.split(":")[0] for w in workers) == ["pod-a", "pod-b"]
        shutil.copytree("models/policy_v1", repo / "policy" / "2")
        (repo / "policy" / "2" / "binserve.json").write_text(json.dumps({"adapter": "torch_module"}))
        r = update(a.base_url, version="2")  # sent to replica a; replica b follows the repository
        assert r.status_code == 200 and r.json()["converged"], r.text
        assert sorted(r.json()["workers"].values()) == ["2", "2"]
        assert {w.split(":")[0] for w in r.json()["workers"]} == {"pod-a", "pod-b"}
        reply = InferenceClient(b.base_url).request(SAMPLE, model="policy")
        assert reply.model_version == "2"
        b.stop()  # replica b exits: its report goes, replica a's stays
        reports = sorted(f.name.split("_")[0] for f in (repo / "policy" / ".workers").glob("*.json"))
        assert reports == ["pod-a"]


def test_metrics_directory_stays_bounded_across_ten_worker_kills(tmp_path):
    mdir = tmp_path / "metrics"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mdir)}
    with ServerProcess(workers=2, models=POLICY, env=env) as srv, InferenceClient(srv.base_url) as client:

        def served() -> float:
            text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("binserve_requests_total{") and 'code="200"' in line
            )

        totals, sent = [], 0
        for _ in range(10):
            pid = requests.get(f"{srv.base_url}/healthz", timeout=10, headers={"Connection": "close"}).json()["pid"]
            for _ in range(3):
                client.infer(SAMPLE, model="policy")
                sent += 1
            os.kill(pid, signal.SIGKILL)  # Gunicorn's master archives its metrics and starts another
            srv.wait_ready(120)
            totals.append(served())
        assert totals == sorted(totals) and totals[-1] >= sent, totals  # never backwards, nothing lost
        files = sorted(f.name for f in mdir.iterdir())
        live = {f.split("_")[-1] for f in files if not f.endswith("archive.db")}
        assert len(live) <= 2 and "counter_archive.db" in files, files  # two live workers' files + archives
        # per live worker one file per kind: counter, histogram, gauge_livesum, gauge_livemax, gauge_livemin
        assert len(files) <= 2 * 5 + 2, files


def test_admin_and_metrics_only_on_the_admin_port():
    admin_port = free_port()
    with ServerProcess(workers=1, models=POLICY, admin_token=ADMIN, admin_port=admin_port) as srv:
        admin_url = f"http://127.0.0.1:{admin_port}"
        assert update(srv.base_url, version="1").status_code == 404
        assert requests.get(f"{srv.base_url}/metrics", timeout=10).status_code == 404
        assert update(admin_url, version="1").status_code == 200
        assert InferenceClient(srv.base_url).infer(SAMPLE, model="policy")["action"].shape == (2,)
        assert "binserve_requests_total" in requests.get(f"{admin_url}/metrics", timeout=10).text
        assert requests.get(f"{admin_url}/healthz", timeout=10).status_code == 200

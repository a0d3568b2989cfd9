"""Document 004, the Flask card (binserve's own): its tests, command lines, headers, routes and
metrics, as written, against real Gunicorn.

The card's server is started the two ways it says: `python server.py --model-path /models --device
cpu --port 50000 --host 0.0.0.0` (a plain model directory: here the example policy, which takes the
card's 480x640x3 image and 6-float state) and `gunicorn -w 4 -b 0.0.0.0:50000 --timeout 120
server:app` (no -c: Gunicorn reads ./gunicorn.conf.py; the model from the environment). Its
`tests/test_server.py` and `tests/test_binary_protocol.py` run unchanged against them, as does its
`locust -f locustfile.py --host http://127.0.0.1:50000`.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.seeds.conftest import ROOT, VERBATIM, code_block, document, port_free
from tests.serverproc import ServerProcess

CARD = VERBATIM / "card_004"
PORT = 50000  # the card's: its test_server.py calls http://127.0.0.1:50000/infer
BIN = Path(sys.executable).parent


def run_card_test(name: str) -> subprocess.CompletedProcess:
    """One of the card's test files, run as its users run it (unittest, from the project root)."""
    return subprocess.run([sys.executable, "-m", "unittest", "-v", str((CARD / "tests" / name).relative_to(ROOT))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A plain model directory, as the card mounts at /models: the example policy's files."""
    d = tmp_path_factory.mktemp("card") / "models"
    shutil.copytree(ROOT / "models" / "policy_v1", d)
    return d


@pytest.fixture(scope="module")
def card_server(model_dir, tmp_path_factory):
    if not port_free(PORT):
        pytest.fail(f"port {PORT} (the card's) is taken on this machine")
    command = [sys.executable, "server.py", "--model-path", str(model_dir), "--device", "cpu", "--port", str(PORT),
               "--host", "0.0.0.0"]  # fmt: skip
    repo = tmp_path_factory.mktemp("card-repo")
    with ServerProcess(command=command, port=PORT, workers=0, model_repository=repo) as srv:
        yield srv


def test_the_copies_are_the_documents_own():
    doc = document("004")
    for name in ("test_binary_protocol.py", "test_server.py"):
        assert (CARD / "tests" / name).read_text() == code_block(doc, f"Create `tests/{name}`:"), name


def test_the_cards_unit_tests_pass():
    result = run_card_test("test_binary_protocol.py")
    assert result.returncode == 0 and "Ran 2 tests" in result.stderr, result.stderr[-2000:]


def test_the_cards_integration_test_passes_against_its_command_line(card_server):
    result = run_card_test("test_server.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test_inference \(.*\) \.\.\. ok", result.stderr) and "Ran 1 test" in result.stderr


def test_the_model_path_is_served_as_the_default_model(card_server, model_dir):
    listing = requests.get(f"{card_server.base_url}/models", timeout=10).json()
    assert listing["default"] == "models" and [m["name"] for m in listing["models"]] == ["models"]
    assert listing["models"][0]["adapter"] == "torch_module" and listing["models"][0]["device"] == "cpu"
    # the repository is not written into the user's model directory
    assert sorted(p.name for p in model_dir.iterdir()) == ["manifest.json", "model.safetensors"]


def test_model_info_and_health_answer_as_the_card_shows(card_server):
    info = requests.get(f"{card_server.base_url}/model_info", timeout=10).json()
    assert info["model_type"] == "PolicyNet" and info["device"] == "cpu"
    assert isinstance(info["parameters"], int) and info["parameters"] > 0
    health = requests.get(f"{card_server.base_url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "healthy" and health.json()["model_loaded"] is True


def test_the_cards_metrics_count_every_request(card_server):
    def card_metrics() -> dict[str, float]:
        text = requests.get(f"{card_server.base_url}/metrics", timeout=10).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in ("inference_requests_total", "inference_latency_seconds_count")}  # fmt: skip

    before = card_metrics()
    rng = np.random.default_rng(0)
    from request_tools import send_inference_request

    for _ in range(3):
        send_inference_request({"state": rng.standard_normal(6).astype(np.float32),
                                "image": rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)},
                               url=f"{card_server.base_url}/infer")  # fmt: skip
    after = card_metrics()
    assert after["inference_requests_total"] - before.get("inference_requests_total", 0) == 3
    assert after["inference_latency_seconds_count"] - before.get("inference_latency_seconds_count", 0) == 3


def test_the_cards_locust_command_runs_without_failures(card_server, tmp_path):
    prefix = tmp_path / "locust"
    # the card's `locust -f locustfile.py --host http://127.0.0.1:50000`, bounded (headless, 10 s)
    result = subprocess.run(
        [str(BIN / "locust"), "-f", "locustfile.py", "--host", "http://127.0.0.1:50000", "--headless", "-u", "8",
         "-r", "8", "-t", "10s", "--csv", str(prefix), "--only-summary", "--stop-timeout", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(f"{prefix}_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["arrays (default model)"]["Request Count"]) >= 10


def test_the_cards_gunicorn_command_serves_with_settings_from_the_environment(card_server, model_dir, tmp_path):
    card_server.stop()  # the card's two ways share its port
    command = [str(BIN / "gunicorn"), "-w", "4", "-b", "0.0.0.0:50000", "--timeout", "120", "server:app"]
    with ServerProcess(command=command, port=PORT, workers=4, model_repository=tmp_path / "repo",
                       model_path=model_dir) as srv:  # fmt: skip
        result = run_card_test("test_server.py")
        assert result.returncode == 0, result.stderr[-3000:]
        pids = {requests.get(f"{srv.base_url}/readyz", timeout=10, headers={"Connection": "close"}).json()["pid"]
                for _ in range(40)}  # fmt: skip
        assert len(pids) >= 2  # more than one of the card's four workers answers

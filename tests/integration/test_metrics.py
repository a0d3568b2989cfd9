"""/metrics under Gunicorn with 2 workers: exact counts in one scrape, histograms agree, promtool passes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from binary_protocol import dict_to_binary
from tests.serverproc import ServerProcess

N = 40


@pytest.fixture(scope="module")
def metrics_server():
    with ServerProcess(workers=2) as srv:
        yield srv


def scrape(srv) -> dict[tuple, float]:
    """Every sample of one /metrics scrape, keyed by (name, sorted labels)."""
    text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lbl), v in samples.items() if n == name and all((k, v2) in lbl for k, v2 in labels.items()))


def post(srv, payload, fresh: bool = True) -> requests.Response:
    headers = {"Content-Type": "application/x-binserve"}
    if fresh:
        headers["Connection"] = "close"  # a new connection each time, so both workers get requests
    return requests.post(f"{srv.base_url}/infer", data=dict_to_binary(payload), headers=headers, timeout=60)


def test_counts_are_exact_across_workers_and_survive_a_dead_worker(metrics_server):
    srv = metrics_server
    pids = set()
    for i in range(N):
        r = post(srv, {"texts": [f"metrics sentence {i}"]})
        assert r.status_code == 200
    for _ in range(500):  # which workers exist (each answers /readyz with its pid); the kernel picks who accepts
        pids.add(requests.get(f"{srv.base_url}/readyz", headers={"Connection": "close"}, timeout=10).json()["pid"])
        if len(pids) == srv.workers:
            break
    m = scrape(srv)
    assert total(m, "binserve_requests_total", model="minilm", code="200") == N
    assert total(m, "binserve_request_duration_seconds_count", model="minilm") == N
    assert total(m, "binserve_queue_duration_seconds_count", model="minilm") == N
    assert total(m, "binserve_batch_size_samples_sum", model="minilm") == N  # every sample ran once
    assert total(m, "binserve_in_flight_requests") == 0
    assert total(m, "binserve_model_info", model="minilm", version="1") == 1
    assert total(m, "binserve_request_bytes_total", model="minilm") > 0

    # a bad request is counted under its status, and as a protocol rejection
    assert post(srv, {"texts": [1]}).status_code == 400
    r = requests.post(
        f"{srv.base_url}/infer",
        data=b"\x80\x05garbage",
        timeout=10,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 400
    m = scrape(srv)
    assert total(m, "binserve_requests_total", code="400") == 2
    assert total(m, "binserve_rejected_requests_total", reason="protocol") == 1

    # kill a worker: Gunicorn replaces it, and no counter goes backwards
    before = total(m, "binserve_requests_total")
    assert len(pids) == 2, f"the requests reached only workers {pids}"
    os.kill(next(iter(pids)), signal.SIGKILL)
    srv.wait_ready(120)
    after = scrape(srv)
    assert total(after, "binserve_requests_total") >= before
    assert total(after, "binserve_request_duration_seconds_count") >= N


def test_batch_size_histogram_shows_batches_over_one_under_concurrency(metrics_server):
    srv = metrics_server
    m0 = scrape(srv)
    with requests.Session() as s, ThreadPoolExecutor(64) as pool:
        body = dict_to_binary({"texts": ["concurrent metrics request"]})
        statuses = list(
            pool.map(
                lambda _: s.post(
                    f"{srv.base_url}/infer", data=body, timeout=60, headers={"Content-Type": "application/x-binserve"}
                ).status_code,
                range(64),
            )
        )
    assert statuses == [200] * 64
    m1 = scrape(srv)
    batches = total(m1, "binserve_batch_size_samples_count") - total(m0, "binserve_batch_size_samples_count")
    singles = total(m1, "binserve_batch_size_samples_bucket", le="1.0") - total(
        m0, "binserve_batch_size_samples_bucket", le="1.0"
    )
    assert batches < 64 and singles < batches, (batches, singles)
    padding = total(m1, "binserve_batch_padding_ratio_count") - total(m0, "binserve_batch_padding_ratio_count")
    assert padding == batches


def test_promtool_accepts_the_exposition(metrics_server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it with apt-get)")
    text = requests.get(f"{metrics_server.base_url}/metrics", timeout=10).content
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()

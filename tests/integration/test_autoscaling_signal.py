"""The autoscaling signal as an autoscaler sees it: a real Prometheus scrapes a real server (Gunicorn,
2 workers, MiniLM) every second and loads binserve's rules; a burst of concurrent clients makes
`binserve_queue_backlog_seconds` rise within a scrape or two, and it falls back to zero once the
burst ends. The prometheus-adapter rule's query, rendered for the pod, returns the same signal."""

from __future__ import annotations

import threading
import time

import pytest

from request_tools import InferenceClient
from tests.promproc import PrometheusProcess
from tests.serverproc import ServerProcess, poll
from tests.unit.test_deploy_rules import adapter_query

TEXTS = [f"a sentence that makes the queue longer, number {i}" for i in range(16)]


@pytest.fixture(scope="module")
def bed():
    with ServerProcess(workers=2) as srv:
        host = srv.base_url.removeprefix("http://")
        with PrometheusProcess({host: {"namespace": "test", "pod": "replica-0"}}, interval_s=1.0) as prom:
            poll(lambda: prom.value('up{job="binserve"}') == 1.0, timeout_s=60)
            yield srv, prom


def burst(url: str, stop: threading.Event, clients: int = 32) -> list[int]:
    """`clients` threads sending 16-text requests until `stop`; requests sent per thread."""
    sent = [0] * clients

    def one(i: int) -> None:
        with InferenceClient(url, timeout=60) as client:
            while not stop.is_set():
                client.infer({"texts": TEXTS})
                sent[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    return sent, threads


def test_the_backlog_gauge_follows_a_load_step(bed):
    srv, prom = bed
    backlog = 'sum(binserve_queue_backlog_seconds{job="binserve", model="minilm"})'
    poll(lambda: prom.value(backlog) == 0.0, timeout_s=30)  # idle, and the gauge exists (warm-up ran batches)
    stop = threading.Event()
    started = time.monotonic()
    sent, threads = burst(srv.base_url, stop)
    try:
        poll(lambda: (prom.value(backlog) or 0.0) > 0.0, timeout_s=20, every_s=0.1)
        rose_after = time.monotonic() - started
        pod = prom.value(adapter_query('namespace="test",pod="replica-0"', "pod"))
        assert pod is not None and pod > 0.0  # what the HPA would read for this pod
        assert (prom.value("model:binserve_queue_backlog_seconds:sum") or 0.0) >= 0.0
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    ended = time.monotonic()
    poll(lambda: prom.value(backlog) == 0.0, timeout_s=20, every_s=0.1)
    fell_after = time.monotonic() - ended
    print(f"\nburst of {sum(sent)} requests from 32 clients: backlog > 0 in Prometheus {rose_after:.1f} s after "
          f"it began, back to 0 {fell_after:.1f} s after it ended (scrape interval {prom.interval_s} s)")  # fmt: skip
    # one scrape interval, plus one for a scrape that began just before the queue filled and the
    # query's own round trip
    assert rose_after <= 2 * prom.interval_s + 1.0
    assert fell_after <= 2 * prom.interval_s + 1.0


def test_the_shipped_rules_evaluate_against_the_live_scrape(bed):
    _, prom = bed
    rules = poll(lambda: [r for r in prom.rules() if r.get("lastEvaluation", "").startswith("2")] or None,
                 timeout_s=30)  # fmt: skip
    assert {r["name"] for r in prom.rules()} >= {"model:binserve_queue_backlog_seconds:sum", "BinserveReplicaDown"}
    assert all(r["health"] == "ok" for r in prom.rules()), [(r["name"], r.get("lastError")) for r in rules]
    assert prom.value('model:binserve_queue_backlog_seconds:sum{model="minilm"}') is not None
    assert not [r for r in prom.rules() if r["type"] == "alerting" and r["state"] == "firing"]

"""Graceful shutdown: SIGTERM with 32 requests in flight loses none, refuses new work, exits in time."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from binary_protocol import dict_to_binary
from request_tools import InferenceClient
from tests.serverproc import ServerProcess, poll

GRACE_S = 20


def in_flight(srv) -> float:
    text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "binserve_in_flight_requests"
    )


def test_sigterm_with_32_requests_in_flight():
    # The batch thread waits up to max_wait_ms for a batch of 64, so the 32 requests stay in flight
    # for seconds whatever the engine's speed on this machine (a fast one drained them before the
    # test could see 32 in flight); the drain then still ends well within the grace period.
    srv = ServerProcess(workers=1, graceful_timeout_s=GRACE_S, max_batch_size=64, max_wait_ms=8000).start()
    try:
        texts = [f"a request still in flight when SIGTERM comes, number {i}" for i in range(32)]
        client = InferenceClient(srv.base_url, retries=0, timeout=60)
        pool = ThreadPoolExecutor(32)
        futures = [pool.submit(client.request, {"texts": [t]}) for t in texts]
        deadline = time.monotonic() + 30
        while in_flight(srv) < 32 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the server's own gauge until all 32 are accepted
        assert in_flight(srv) == 32
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        # new work is turned away: the master closed the listener (refused), or a worker says 503; one
        # that raced the signal into an accept is answered (after the batch's wait), then the next is refused
        turned_away, deadline = False, time.monotonic() + GRACE_S
        while not turned_away and time.monotonic() < deadline:
            try:
                r = requests.post(
                    f"{srv.base_url}/infer",
                    data=dict_to_binary({"texts": ["late"]}),
                    timeout=GRACE_S,
                    headers={"Content-Type": "application/x-binserve", "Connection": "close"},
                )
                turned_away = r.status_code == 503
            except requests.ConnectionError:
                turned_away = True
        assert turned_away, "new requests were still accepted after SIGTERM"
        replies = [f.result(timeout=GRACE_S + 10) for f in futures]
        assert [r.outputs["embeddings"].shape for r in replies] == [(1, 384)] * 32
        assert srv.proc.wait(timeout=GRACE_S + 5) == 0
        assert time.monotonic() - t0 < GRACE_S + 5
        pool.shutdown()
    finally:
        srv.stop()


def test_a_drain_delay_keeps_serving_while_readyz_turns_away_the_load_balancer():
    """drain_delay_s: after SIGTERM the worker answers /readyz 503 at once (a health-checking load
    balancer takes it out) yet goes on serving requests until the delay ends, then drains."""
    delay = 3.0
    srv = ServerProcess(workers=1, drain_delay_s=delay, graceful_timeout_s=GRACE_S).start()
    try:
        client = InferenceClient(srv.base_url, retries=0, timeout=30)
        client.infer({"texts": ["before"]})
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)  # to the master, which passes it on to the worker

        def readyz():
            return requests.get(f"{srv.base_url}/readyz", timeout=5, headers={"Connection": "close"})

        # 503 as soon as the worker has the signal (the master forwards it: not at the same instant)
        # (a Response is falsy when not ok: poll for its status, then read it)
        poll(lambda: readyz().status_code == 503, timeout_s=1.0, every_s=0.02)
        assert readyz().json()["status"] == "draining"
        served = 0
        while time.monotonic() - t0 < delay - 1.0:  # well inside the delay: still served
            reply = InferenceClient(srv.base_url, retries=0, timeout=30).request({"texts": [f"during {served}"]})
            assert reply.status == 200
            served += 1
        assert srv.proc.wait(delay + GRACE_S) == 0
        assert time.monotonic() - t0 >= delay  # it waited the delay before it drained and exited
    finally:
        srv.stop()
    assert served > 0

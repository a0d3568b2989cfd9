"""Overload: a small queue answers 429 with Retry-After at once, and the server recovers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from binary_protocol import dict_to_binary
from binserve import errors
from request_tools import InferenceClient
from tests.serverproc import ServerProcess


@pytest.fixture(scope="module")
def small_queue_server():
    with ServerProcess(workers=1, max_queue_samples=4, max_batch_size=4) as srv:
        yield srv


def test_overload_gives_429_then_recovers(small_queue_server):
    base = small_queue_server.base_url
    texts = [f"text number {i} " * 20 for i in range(96)]

    def call(client, t):
        try:
            client.infer({"texts": [t]})
            return 200, None
        except errors.Overloaded as exc:
            return 429, exc

    with InferenceClient(base, retries=0) as client, ThreadPoolExecutor(48) as pool:
        results = list(pool.map(lambda t: call(client, t), texts))
    statuses = [s for s, _ in results]
    assert statuses.count(429) > 0, "a 4-sample queue under 48 concurrent clients never overflowed"
    assert statuses.count(200) > 0
    overloaded = next(e for s, e in results if s == 429)
    assert overloaded.retry_after_s is not None and overloaded.retry_after_s >= 1
    assert "samples queued" in overloaded.message
    # the server recovered: sequential requests all succeed, and retries absorb 429s under load
    with InferenceClient(base, retries=5) as client:
        for t in texts[:5]:
            assert client.infer({"texts": [t]})["embeddings"].shape == (1, 384)
    r = requests.get(f"{base}/models", timeout=10).json()
    stats = r["models"][0]["stats"]
    assert stats["rejected"] == statuses.count(429)


def server_interval(reply, ended: float) -> tuple[float, float]:
    """When a thread ran the request: from leaving the event loop to the reply (Server-Timing's
    steps after `wait`, the time a complete request waited for a thread or for the budget)."""
    steps = dict(part.strip().split(";dur=") for part in reply.headers["Server-Timing"].split(","))
    ran_ms = sum(float(v) for k, v in steps.items() if k != "wait")
    return ended - ran_ms / 1000, ended


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap by more than a fifth of the shortest one. The ends are the
    client's receive times, which on a busy machine lag the server's by a variable few tens of ms:
    back-to-back requests (a gap of a few ms on the server) must not count as held together."""
    slack = 0.2 * min(b - a for a, b in intervals)
    events = sorted([(a + slack, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("budget_mib", [10, 1024])
def test_large_bodies_sent_at_once_are_run_as_the_memory_budget_allows(budget_mib):
    """Six ~2 MB bodies at once: with max_inflight_bytes room for one (5 x its body), the worker
    reads and runs them one after the other (TCP backpressure, no error); with room for all,
    all six are held at once. Memory for requests is bounded by the budget, not by the clients.
    (Each body is 8 rows of 32000 token ids, truncated to the model's 256: large, cheap to run.)"""
    ids = np.random.default_rng(0).integers(1000, 2000, size=(8, 32_000), dtype=np.int64)
    with ServerProcess(workers=1, max_body_bytes=2 << 20, max_inflight_bytes=budget_mib << 20) as srv:

        def call(_):
            with InferenceClient(srv.base_url, retries=0, timeout=300) as client:
                reply = client.request({"input_ids": ids})
                return reply, time.monotonic()

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, range(6)))
    assert all(r.outputs["embeddings"].shape == (8, 384) for r, _ in results)
    held = most_at_once([server_interval(r, t) for r, t in results])
    if budget_mib == 10:
        assert held == 1  # room for one: the others waited in their sockets, not in memory
    else:
        assert held >= 4  # the control: without the budget they are all held at once


def test_partial_bodies_over_the_budget_cannot_stall_the_worker():
    """Eight uploads of ~1.9 MB under a 10 MiB budget, each sending 1.6 MB and then pausing (a slow
    client, as many large ones arriving at once): the partial bodies alone pass the budget, so every
    connection pauses with nothing complete and nothing running. Reading must go on (the one closest
    to complete first) or no bytes are ever given back: seen as a hang of the image's memory-limit
    test, 29 bodies of 64 MiB against 1 GiB per worker. Every upload gets its answer."""
    import socket

    body = dict_to_binary({"input_ids": np.full((232, 1024), 40_000, np.int64)})  # ids outside the vocabulary
    assert 1_800_000 < len(body) < 2 << 20
    head = (f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-binserve\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    first = 1_600_000
    with ServerProcess(workers=1, max_body_bytes=2 << 20, max_inflight_bytes=10 << 20) as srv:
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
        for s in socks:
            s.sendall(head + body[:first])
        # the server reads what has come and pauses on the budget; the clients send the rest after
        # a moment (each sendall returns once the kernel took the bytes or blocks if it cannot)
        time.sleep(1.0)  # the slow clients' pause, not a wait for the server

        def finish(s: socket.socket) -> bytes:
            s.settimeout(60)
            s.sendall(body[first:])
            reply = b""
            while b"\r\n" not in reply:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            s.close()
            return reply.split(b"\r\n", 1)[0]

        with ThreadPoolExecutor(8) as pool:
            lines = list(pool.map(finish, socks))
    assert [line.split()[1] for line in lines] == [b"400"] * 8, lines  # refused (ids outside the vocabulary)

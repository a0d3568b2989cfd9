"""Overload: a small queue answers 429 with Retry-After at once, and the server recovers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

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

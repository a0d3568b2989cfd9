"""Quotas and the response cache where they must hold across processes: the workers of one real
Gunicorn server, and two servers (replicas) sharing a real redis-server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests

from tests.redisproc import RedisProcess
from tests.serverproc import ServerProcess

ONE_KEY = "sk-one-replica-0123456789"
SHARED_KEY = "sk-two-replicas-01234567"
OPEN_KEY = "sk-open-0123456789abcdef"
# a bucket that refills one request a minute: what the tests send in seconds, only the burst admits
KEYS = {"keys": [
    {"name": "one", "key": ONE_KEY, "requests_per_minute": 1, "burst": 40},
    {"name": "shared", "key": SHARED_KEY, "requests_per_minute": 1, "burst": 30},
    {"name": "open", "key": OPEN_KEY, "tokens_per_minute": 1_000_000},
]}  # fmt: skip


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return str(path)


@pytest.fixture(scope="module")
def redis_server():
    srv = RedisProcess()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def embedded(keys_file):
    """One replica, two workers, no Redis: quotas in the workers' shared table."""
    with ServerProcess(workers=2, api_keys_file=keys_file, response_cache_bytes=4 << 20) as srv:
        yield srv


@pytest.fixture(scope="module")
def replicas(keys_file, redis_server):
    """Two replicas (one worker each, as two small pods) sharing Redis and nothing else."""
    a = ServerProcess(workers=1, api_keys_file=keys_file, redis_url=redis_server.url, response_cache_bytes=4 << 20)
    b = ServerProcess(workers=1, api_keys_file=keys_file, redis_url=redis_server.url, response_cache_bytes=4 << 20)
    with a, b:
        yield a, b


def _infer(base_url: str, key: str, text: str = "quota") -> requests.Response:
    # a new connection per request, so that every worker of a server gets some
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
    return requests.post(f"{base_url}/infer", json={"texts": [text]}, headers=headers, timeout=60)


def test_a_quota_is_exact_across_the_workers_of_a_replica(embedded):
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: _infer(embedded.base_url, ONE_KEY, f"t{i}").status_code, range(100)))
    assert codes.count(200) in (40, 41), codes  # the burst, and at most one refilled meanwhile
    assert codes.count(429) == 100 - codes.count(200)
    scrape = requests.get(f"{embedded.base_url}/metrics", timeout=10).text
    assert 'binserve_key_requests_total{key="one",outcome="rate_limited"}' in scrape


def test_the_openai_package_reads_the_rate_limit_headers(embedded):
    client = openai.OpenAI(base_url=f"{embedded.base_url}/v1", api_key=OPEN_KEY, max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="minilm", input=["rate limited?"])
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert 0 < int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    assert len(raw.parse().data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{embedded.base_url}/v1", api_key="sk-wrong", max_retries=0).embeddings.create(
            model="minilm", input="x"
        )


def test_a_quota_is_exact_across_replicas_sharing_redis(replicas):
    a, b = replicas
    urls = [a.base_url, b.base_url] * 40
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda u: _infer(u, SHARED_KEY).status_code, urls))
    assert codes.count(200) in (30, 31), codes
    per_replica = [codes[i::2].count(200) for i in (0, 1)]
    assert all(n > 0 for n in per_replica), per_replica  # both replicas admitted some of the 30


def test_a_reply_computed_on_one_replica_is_a_hit_on_the_other(replicas, redis_server):
    a, b = replicas
    first = _infer(a.base_url, OPEN_KEY, "shared cache across replicas")
    second = _infer(b.base_url, OPEN_KEY, "shared cache across replicas")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert second.json() == first.json() and second.headers["X-Batch-Size"] == "0"
    assert any(k.startswith(b"binserve:cache:") for k in redis_server.client.scan_iter(count=1000))


def test_without_redis_each_worker_has_its_own_cache_and_every_hit_is_right(embedded):
    replies = [_infer(embedded.base_url, OPEN_KEY, "per-worker cache") for _ in range(12)]
    assert [r.status_code for r in replies] == [200] * 12
    assert {r.headers["X-Cache"] for r in replies} == {"miss", "hit"}
    first = np.asarray(replies[0].json()["embeddings"])
    # each worker's miss ran its own batch (maybe on another gated engine): equal up to rounding
    assert all(np.allclose(np.asarray(r.json()["embeddings"]), first, rtol=1e-4, atol=1e-6) for r in replies)
    assert sum(r.headers["X-Cache"] == "miss" for r in replies) <= 2  # at most one miss per worker

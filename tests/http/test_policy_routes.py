"""API keys, quotas, the response cache and CORS on the real app (Flask's test client, fake models)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from binserve.config import ServerConfig
from binserve.policy import buckets
from server import create_app

APP_KEY = "sk-app-0123456789abcdef"
LIMITED_KEY = "sk-limited-0123456789ab"
TOKENS_KEY = "sk-tokens-0123456789abc"


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"name": "app", "key": APP_KEY, "models": ["embed"], "routes": ["native", "openai"]},
        {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 6, "burst": 2},
        {"name": "tokens", "key": TOKENS_KEY, "requests_per_minute": 600, "burst": 10, "tokens_per_minute": 60},
    ]}))  # fmt: skip
    return str(path)


@pytest.fixture
def policy_client(manager, keys_file):
    def make(**settings):
        buckets._table = None  # each app its own buckets (a fresh server)
        return create_app(ServerConfig(api_keys_file=keys_file, **settings), manager=manager).test_client()

    return make


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _count(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_keys_are_scoped_to_models_and_route_families(policy_client):
    c = policy_client()
    assert c.post("/infer/embed", json={"texts": "hi"}, headers=_auth(APP_KEY)).status_code == 200
    r = c.post("/infer/double", json={"x": [1, 2, 3]}, headers=_auth(APP_KEY))
    assert r.status_code == 403 and "may not use model 'double'" in r.json["error"]["message"]
    r = c.post("/v2/models/embed/infer", json={"inputs": []}, headers=_auth(APP_KEY))
    assert r.status_code == 403 and "KServe V2 routes" in r.json["error"]
    r = c.post("/infer", json={"x": [1, 2, 3]}, headers=_auth(APP_KEY))  # the default model is checked too
    assert r.status_code == 403 and "'double'" in r.json["error"]["message"]
    r = c.post("/v1/embeddings", json={"model": "embed", "input": "hi"}, headers=_auth(APP_KEY))
    assert r.status_code == 200
    listed = c.get("/v1/models", headers=_auth(APP_KEY)).json["data"]
    assert [m["id"] for m in listed] == ["embed"]  # a key sees only what it may use


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope-not-a-key-at-all", "Basic " + APP_KEY,
                                    "Bearer " + "k" * 70_000])  # fmt: skip
def test_no_key_or_an_unknown_key_is_401(policy_client, header):
    c = policy_client()
    r = c.post("/infer/embed", json={"texts": "hi"}, headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json["error"]["type"] == "unauthorized"
    assert "sk-" not in r.get_data(as_text=True)


def test_the_single_token_setting_is_one_more_key(policy_client):
    c = policy_client(auth_token="legacy-secret")
    assert c.post("/infer/double", json={"x": [1, 2, 3]}, headers=_auth("legacy-secret")).status_code == 200
    assert c.post("/infer/double", json={"x": [1, 2, 3]}, headers=_auth(APP_KEY)).status_code == 403


def test_a_request_over_its_quota_is_429_with_openais_headers(policy_client):
    c = policy_client()
    before = _count("binserve_key_requests_total", {"key": "limited", "outcome": "rate_limited"})
    ok = [c.post("/infer/double", json={"x": [1, 2, 3]}, headers=_auth(LIMITED_KEY)) for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "6"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert ok[1].headers["x-ratelimit-remaining-requests"] == "0"
    r = c.post("/infer/double", json={"x": [1, 2, 3]}, headers=_auth(LIMITED_KEY))
    assert r.status_code == 429 and r.json["error"]["type"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 10  # one request refills in 10 s
    assert 9000 < int(r.headers["retry-after-ms"]) <= 10_000
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    assert _count("binserve_key_requests_total", {"key": "limited", "outcome": "rate_limited"}) == before + 1
    o = c.post("/v1/embeddings", json={"model": "embed", "input": "hi"}, headers=_auth(LIMITED_KEY))
    assert o.status_code == 429 and o.json["error"]["type"] == "rate_limit_error"  # OpenAI's shape


def test_token_quotas_count_input_tokens_and_refuse_before_the_batch(policy_client, manager):
    c = policy_client()
    # the fake model's tokens are the text's bytes; the token bucket spans what the request burst
    # does (10 at 600/min: 1 s, so 1 token at 60/min): a 30-byte text is admitted when the bucket
    # is full and leaves it 29 in debt, so the next request is refused before it is decoded
    r = c.post("/infer/embed", json={"texts": "x" * 30}, headers=_auth(TOKENS_KEY))
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == "60"
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    r = c.post("/infer/embed", json={"texts": "y"}, headers=_auth(TOKENS_KEY))
    assert r.status_code == 429 and "over its quota" in r.json["error"]["message"]
    assert _count("binserve_key_tokens_total", {"key": "tokens"}) >= 30


def test_identical_requests_are_answered_from_the_cache_across_protocols(make_client):
    c = make_client(response_cache_bytes=1 << 20)
    first = c.post("/infer/embed", json={"texts": ["cache me"]})
    again = c.post("/infer/embed", json={"texts": ["cache me"]})
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit")
    assert again.headers["X-Batch-Size"] == "0" and again.json == first.json
    openai = c.post("/v1/embeddings", json={"model": "embed", "input": ["cache me"]})
    assert openai.headers["X-Cache"] == "hit"  # one entry for the same tokens, whatever the protocol
    assert openai.json["data"][0]["embedding"] == pytest.approx(first.json["embeddings"][0])
    single = c.post("/infer/embed", json={"texts": "cache me"})
    assert single.headers["X-Cache"] == "miss"  # a reply without the batch axis is another entry
    bypass = c.post("/infer/embed", json={"texts": ["cache me"]}, headers={"Cache-Control": "no-cache"})
    assert bypass.headers["X-Cache"] == "miss" and bypass.headers["X-Batch-Size"] != "0"
    unstored = c.post("/infer/embed", json={"texts": ["never kept"]}, headers={"Cache-Control": "no-store"})
    assert unstored.headers["X-Cache"] == "miss"
    assert c.post("/infer/embed", json={"texts": ["never kept"]}).headers["X-Cache"] == "miss"  # not stored


def test_a_new_version_is_never_answered_from_the_old_ones_entries(make_client, manager):
    c = make_client(response_cache_bytes=1 << 20)
    assert c.post("/infer/double", json={"x": [1, 2, 3]}).headers["X-Cache"] == "miss"
    assert c.post("/infer/double", json={"x": [1, 2, 3]}).headers["X-Cache"] == "hit"
    manager.get("double").adapter.version = "2"
    try:
        r = c.post("/infer/double", json={"x": [1, 2, 3]})
        assert r.headers["X-Cache"] == "miss" and r.headers["X-Model-Version"] == "2"
    finally:
        manager.get("double").adapter.version = "1"


def test_a_model_with_the_cache_off_is_never_cached(make_client, manager):
    c = make_client(response_cache_bytes=1 << 20)
    manager.get("double").cacheable = False
    try:
        replies = [c.post("/infer/double", json={"x": [1, 2, 3]}) for _ in range(2)]
        assert all("X-Cache" not in r.headers for r in replies)
    finally:
        manager.get("double").cacheable = True
    assert "X-Cache" not in make_client().post("/infer/double", json={"x": [1, 2, 3]}).headers  # off by default


def test_churning_the_cache_keeps_it_within_its_bytes(make_client):
    from binserve.policy.cache import ENTRY_OVERHEAD

    capacity = 32 * 1024
    c = make_client(response_cache_bytes=capacity)
    for i in range(300):
        assert c.post("/infer/embed", json={"texts": [f"text {i}"]}).headers["X-Cache"] == "miss"
    assert 0 < REGISTRY.get_sample_value("binserve_cache_bytes") <= capacity
    entries = REGISTRY.get_sample_value("binserve_cache_entries")
    assert entries * ENTRY_OVERHEAD <= capacity and entries < 300
    assert _count("binserve_cache_evictions_total", {"model": "embed"}) > 0


def test_cors_preflight_is_answered_for_inference_routes_only(make_client):
    c = make_client(cors_allow_origins="https://app.example.com")
    pre = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    r = c.options("/v1/embeddings", headers=pre)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert r.headers["Vary"] == "Origin"
    for admin in ("/update_model", "/metrics", "/models/double/unload"):
        assert "Access-Control-Allow-Origin" not in c.options(admin, headers=pre).headers, admin
    bad = c.options("/infer/embed", headers={**pre, "Origin": "https://evil.example.com"})
    assert bad.status_code == 403 and "Access-Control-Allow-Origin" not in bad.headers
    reply = c.post("/infer/embed", json={"texts": "hi"}, headers={"Origin": "https://app.example.com"})
    assert reply.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "x-ratelimit-remaining-requests" in reply.headers["Access-Control-Expose-Headers"]
    other = c.post("/infer/embed", json={"texts": "hi"}, headers={"Origin": "https://evil.example.com"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Origin" not in make_client().options("/infer/embed", headers=pre).headers


def test_a_bad_keys_file_or_origin_stops_the_app(manager, tmp_path):
    (tmp_path / "k.json").write_text('{"keys": [{"name": "a"}]}')
    with pytest.raises(ValueError, match="exactly one of"):
        create_app(ServerConfig(api_keys_file=str(tmp_path / "k.json")), manager=manager)
    with pytest.raises(ValueError, match="not an origin"):
        create_app(ServerConfig(cors_allow_origins="javascript:alert(1)"), manager=manager)


def test_a_fan_out_is_scoped_per_model_and_charged_per_model(policy_client):
    c = policy_client()
    r = c.post("/infer", json={"texts": ["abc"], "models": ["embed", "shout"]}, headers=_auth(APP_KEY))
    assert r.status_code == 403 and "may not use model 'shout'" in r.json["error"]["message"]
    before = _count("binserve_key_tokens_total", {"key": "limited"})
    r = c.post("/infer", json={"texts": ["abc"], "models": ["embed", "shout"]}, headers=_auth(LIMITED_KEY))
    assert r.status_code == 200
    assert _count("binserve_key_tokens_total", {"key": "limited"}) - before == 6  # 3 tokens, read by 2 models

"""The source documents' probes and credentials on the real app (Flask's test client, fake models):
`GET /health` on a server with no generative model, `GET /model_info`, the Flask card's `X-API-Key`
header, its two metrics, and `"status": "ok"` in /infer replies."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from binserve.config import ServerConfig
from binserve.policy import buckets
from server import create_app
from tests.http.fakes import DoubleAdapter, add_model

KEY = "your-secret-key-0123"  # a keys file's key (16 characters at least)


def test_health_is_200_on_a_server_without_a_generative_model(client, manager):
    assert not any(m.adapter.generates for m in manager.served())
    client.post("/infer/embed", json={"texts": ["one", "two"]})
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json
    assert body["status"] == "healthy" and body["is_ready"] is True and body["model_loaded"] is True
    assert body["models_loaded"] == body["models"] == ["double", "embed", "shout", "broken"]
    assert body["default_model"] == "double" and body["gpu_available"] is False and body["gpu_count"] == 0
    stats = body["stats"]["embed"]
    assert set(stats) == {"total_requests", "total_batches", "avg_batch_size", "avg_latency", "throughput"}
    assert stats["total_requests"] >= 1


@pytest.mark.parametrize(("state", "status"), [("loading", "loading"), ("draining", "draining"),
                                               ("others", "loading: other workers")])  # fmt: skip
def test_health_is_503_naming_the_state_until_every_worker_is_ready(client, manager, state, status):
    if state == "loading":
        manager.ready = False
    elif state == "draining":
        manager.draining = True
    else:
        manager.others_ready = False
    r = client.get("/health")
    assert r.status_code == 503 and r.json["status"].startswith(status) and r.json["is_ready"] is False
    assert client.get("/readyz").status_code == 503  # the two always agree


def test_model_info_describes_the_default_model_and_is_503_before_it_is_ready(client, manager):
    r = client.get("/model_info")
    assert r.status_code == 200 and r.json["name"] == "double" and set(r.json) >= {"model_type", "device", "parameters"}
    manager.ready = False
    r = client.get("/model_info")
    assert r.status_code == 503 and r.json == {"error": "Model not loaded"}


@pytest.fixture
def keyed(manager, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "card", "key": KEY, "models": ["embed"], "routes": ["native"]}]}))
    buckets._table = None
    return create_app(ServerConfig(api_keys_file=str(path)), manager=manager).test_client()


def test_x_api_key_is_a_bearer_key_with_its_scopes(keyed):
    ok = keyed.post("/infer/embed", json={"texts": "hi"}, headers={"X-API-Key": KEY})
    assert ok.status_code == 200 and ok.json["status"] == "ok"
    wrong = keyed.post("/infer/embed", json={"texts": "hi"}, headers={"X-API-Key": "not-the-key"})
    assert wrong.status_code == 401 and wrong.json["error"]["message"] == "the API key is not valid"
    none = keyed.post("/infer/embed", json={"texts": "hi"})
    assert none.status_code == 401 and "X-API-Key" in none.json["error"]["message"]
    scoped = keyed.post("/infer/double", json={"x": [1.0, 2.0, 3.0]}, headers={"X-API-Key": KEY})
    assert scoped.status_code == 403  # the key's model scope holds for the header too
    routes = keyed.post("/v1/embeddings", json={"model": "embed", "input": "hi"}, headers={"X-API-Key": KEY})
    assert routes.status_code == 403  # and its route families
    # Authorization, when sent, is what counts (a wrong bearer is not rescued by a right X-API-Key)
    both = keyed.post("/infer/embed", json={"texts": "hi"}, headers={"Authorization": "Bearer nope", "X-API-Key": KEY})
    assert both.status_code == 401


def test_the_cards_own_key_works_as_the_servers_token(make_client):
    c = make_client(auth_token="your-secret-key")  # the card's API_KEY, sent as its decorator reads it
    ok = c.post("/infer/double", json={"x": [1.0, 2.0, 3.0]}, headers={"X-API-Key": "your-secret-key"})
    assert ok.status_code == 200
    r = c.post("/infer/double", json={"x": [1.0, 2.0, 3.0]}, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401  # as the card's decorator answers an invalid key


def test_x_api_key_opens_the_admin_routes_as_the_bearer_does(make_client):
    c = make_client(admin_token="adm1n")
    assert c.post("/update_model", json={"model": "double", "version": "2"}, headers={"X-API-Key": "bad"}).status_code \
        == 403  # fmt: skip
    r = c.post("/update_model", json={"model": "double", "version": "2"}, headers={"X-API-Key": "adm1n"})
    assert r.status_code == 200, r.get_data()


def test_the_cards_metrics_count_each_inference_request_once(client):
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = (sample("inference_requests_total"), sample("inference_latency_seconds_count"))
    client.post("/infer/double", json={"x": [1.0, 2.0, 3.0]})
    client.post("/infer", json={"texts": ["a"], "models": ["embed", "shout"]})  # a fan-out: one request
    client.post("/infer/nope", json={"x": [1.0, 2.0, 3.0]})  # refused requests are requests too
    client.get("/models")  # not an inference request
    assert sample("inference_requests_total") - before[0] == 3
    assert sample("inference_latency_seconds_count") - before[1] == 3


def test_a_hub_id_is_a_model_name_on_every_route(client, manager):
    add_model(manager, DoubleAdapter("org/double-v1"))
    x = {"x": [1.0, 2.0, 3.0]}
    assert client.post("/infer/org/double-v1", json=x).json == {"y": [2.0, 4.0, 6.0], "status": "ok"}
    assert client.get("/v2/models/org/double-v1").json["name"] == "org/double-v1"
    assert client.get("/v2/models/org/double-v1/ready").status_code == 200
    assert client.get("/v2/models/org/double-v1/versions/1/ready").status_code == 200
    v2 = client.post("/v2/models/org/double-v1/infer",
                     json={"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]})  # fmt: skip
    assert v2.status_code == 200 and v2.json["model_name"] == "org/double-v1"
    assert client.get("/v1/models/org/double-v1").json["id"] == "org/double-v1"
    # the plain names' routes read as before: "double/ready" is double's readiness, not a model
    assert client.get("/v2/models/double/ready").status_code == 200
    assert client.get("/v2/models/double").json["name"] == "double"
    missing = client.post("/infer/org/nope", json=x)
    assert missing.status_code == 404 and "'org/nope'" in missing.json["error"]["message"]
    assert client.post("/infer/a/b/c", json=x).status_code == 404  # three segments: no route


def test_openai_any_model_answers_any_name_with_the_one_generative_model(lm_manager, make_client):
    body = {"model": "smol-lm", "messages": [{"role": "user", "content": "What is the capital of Australia?"}],
            "max_tokens": 3}  # fmt: skip
    strict = make_client().post("/v1/chat/completions", json=body)
    assert strict.status_code == 404 and "'smol-lm'" in strict.json["error"]["message"]
    loose = make_client(openai_any_model=True)
    r = loose.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json["model"] == "lm"
    # a served model's own name still means that model, generative or not
    assert loose.post("/v1/chat/completions", json=body | {"model": "embed"}).status_code == 400


def test_classify_without_a_capability_configuration_is_a_404_saying_how(client):
    r = client.post("/classify", json={"texts": ["x"], "capabilities": ["classification"]})
    assert r.status_code == 404 and "--config topics.json" in r.json["error"]["message"]

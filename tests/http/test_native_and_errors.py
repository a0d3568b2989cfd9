"""The HTTP layer in process: the native route, one error mapping per protocol, auth, headers, admin, health."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from binary_protocol import binary_to_dict, dict_to_binary


def test_native_infer_answers_outputs_and_metadata_headers(client):
    resp = client.post("/infer/double", json={"x": [1.0, 2.0, 3.0]}, headers={"X-Request-Id": "abc-1"})
    assert resp.status_code == 200
    assert resp.get_json() == {"y": [2.0, 4.0, 6.0], "status": "ok"}
    assert resp.headers["X-Request-Id"] == "abc-1"
    assert resp.headers["X-Model"] == "double"
    assert resp.headers["X-Model-Version"] == "1"
    assert resp.headers["X-Batch-Size"] == "1"
    assert [p.split(";")[0] for p in resp.headers["Server-Timing"].split(", ")] == [
        "decode",
        "queue",
        "infer",
        "encode",
    ]


def test_native_framed_request_gets_a_framed_reply(client):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    resp = client.post("/infer", data=dict_to_binary({"x": x}), content_type="application/x-binserve")
    assert resp.status_code == 200
    assert resp.content_type == "application/x-binserve"
    np.testing.assert_array_equal(binary_to_dict(resp.data)["y"], 2 * x)


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/infer/nope", lambda b: b["error"]["type"] == "model_not_found" and "'nope'" in b["error"]["message"]),
        ("/v2/models/nope/infer", lambda b: isinstance(b["error"], str) and "'nope'" in b["error"]),
        (
            "/v1/embeddings",
            lambda b: b["error"]["type"] == "invalid_request_error" and "'nope'" in b["error"]["message"],
        ),
    ],
)
def test_unknown_model_is_404_in_each_protocols_error_shape(client, path, shape):
    body = {"model": "nope", "input": "x"} if path.startswith("/v1") else {"inputs": []}
    resp = client.post(path, json=body)
    assert resp.status_code == 404
    assert shape(resp.get_json())


def test_unknown_routes_answer_in_the_prefixes_shape(client):
    assert isinstance(client.get("/v2/nothing").get_json()["error"], str)
    assert client.get("/v1/nothing").get_json()["error"]["type"] == "invalid_request_error"
    assert client.get("/nothing").get_json()["error"]["type"] == "not_found"


def test_loading_model_is_503_with_retry_after(client):
    resp = client.post("/infer/loading", json={"x": [1, 2, 3]})
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "1"
    assert resp.get_json()["error"]["type"] == "not_ready"


def test_bad_input_is_400_naming_it_and_unknown_media_type_is_415(client):
    resp = client.post("/infer/double", json={"x": [1, 2]})
    assert resp.status_code == 400
    assert "'x'" in resp.get_json()["error"]["message"]
    resp = client.post("/infer/double", data=b"x=1", content_type="text/plain")
    assert resp.status_code == 415
    resp = client.post("/infer/double", json={"x": [1, 2, 3]}, headers={"X-Request-Timeout-Ms": "soon"})
    assert resp.status_code == 400 and "X-Request-Timeout-Ms" in resp.get_json()["error"]["message"]


def test_json_over_its_limit_is_413_and_closes_the_connection(make_client):
    client = make_client(max_json_bytes=1024)
    resp = client.post("/infer/double", data=json.dumps({"x": [1.0] * 600}), content_type="application/json")
    assert resp.status_code == 413
    assert resp.headers["Connection"] == "close"
    message = resp.get_json()["error"]["message"]  # and says where larger inputs go
    assert "1024-byte limit (max_json_bytes)" in message and "binary formats" in message and "max_body_bytes" in message


def test_an_unexpected_error_is_500_with_a_request_id_and_no_internals(client, manager, monkeypatch):
    def boom(payload):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(manager.get("double").adapter, "validate", boom)
    resp = client.post("/infer/double", json={"x": [1, 2, 3]}, headers={"X-Request-Id": "rid-7"})
    assert resp.status_code == 500
    message = resp.get_json()["error"]["message"]
    assert "rid-7" in message and "secret" not in message and "RuntimeError" not in message


@pytest.mark.parametrize(
    ("method", "path", "body", "with_token"),
    [
        ("post", "/infer/double", {"x": [1, 2, 3]}, 200),
        (
            "post",
            "/v2/models/double/infer",
            {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]},
            200,
        ),
        ("post", "/v1/embeddings", {"model": "embed", "input": "hi"}, 200),
        ("get", "/v1/models", None, 200),
        ("get", "/v1/models/embed", None, 200),
        # the fakes hold no generative model: past the token, the route's own 400 says so
        ("post", "/v1/completions", {"model": "double", "prompt": "hi"}, 400),
        ("post", "/v1/chat/completions", {"model": "double", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ],
)
def test_the_inference_token_guards_every_protocol(make_client, method, path, body, with_token):
    client = make_client(auth_token="s3cret")
    call = getattr(client, method)
    kwargs = {"json": body} if body is not None else {}
    assert call(path, **kwargs).status_code == 401
    # an unknown key is 401, as OpenAI's API answers it; 403 is kept for what a valid key may not do
    assert call(path, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
    assert call(path, headers={"Authorization": "Bearer s3cret"}, **kwargs).status_code == with_token


def test_metadata_and_health_need_no_token(make_client):
    client = make_client(auth_token="s3cret")
    for path in ("/healthz", "/readyz", "/models", "/v2", "/v2/health/ready", "/v2/models/double"):
        assert client.get(path).status_code == 200, path


def test_update_model_is_off_without_an_admin_token_and_needs_it_when_set(make_client, manager):
    assert make_client().post("/update_model", json={"version": "2"}).status_code == 403
    client = make_client(admin_token="adm1n")
    assert client.post("/update_model", json={"version": "2"}).status_code == 401
    bad = client.post("/update_model", json={"version": "2", "path": "/x"}, headers={"Authorization": "Bearer adm1n"})
    assert bad.status_code == 400 and manager.calls == []
    ok = client.post(
        "/update_model", json={"model": "double", "version": "2"}, headers={"Authorization": "Bearer adm1n"}
    )
    assert ok.status_code == 200
    assert manager.calls == [{"model": "double", "version": "2", "path": None, "adapter": None, "timeout_s": 120.0}]


def test_with_an_admin_port_admin_routes_answer_only_there(make_client):
    client = make_client(admin_token="adm1n", admin_port=9100)
    assert client.get("/metrics").status_code == 404
    assert client.post("/update_model", json={"version": "2"}).status_code == 404
    assert client.get("/metrics", base_url="http://localhost:9100").status_code == 200
    assert client.post("/infer/double", json={"x": [1, 2, 3]}).status_code == 200


def test_readiness_follows_the_manager(client, manager):
    assert client.get("/readyz").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    manager.others_ready = False  # this worker is, another of the server's is still loading
    assert client.get("/readyz").status_code == 503
    manager.others_ready = True
    manager.ready = False
    assert client.get("/readyz").get_json()["status"] == "loading"
    manager.loading = lambda: {"double": {"state": "loading", "version": "3", "seconds": 12.4},
                               "other": {"state": "waiting"}}  # fmt: skip
    body = client.get("/readyz").get_json()
    assert body["status"] == "loading: double version 3 for 12s; then other"
    assert body["loading"]["double"]["seconds"] == 12.4
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    manager.draining = True
    assert client.get("/readyz").get_json()["status"] == "draining"
    assert client.get("/healthz").status_code == 200


def _requests(model: str, protocol: str, code: str) -> float:
    value = REGISTRY.get_sample_value("binserve_requests_total", {"model": model, "code": code, "protocol": protocol})
    return value or 0.0


def test_request_metrics_count_every_protocol_under_its_label(client):
    before = {p: _requests(m, p, "200") for m, p in (("double", "native"), ("double", "v2"), ("embed", "openai"))}
    client.post("/infer/double", json={"x": [1, 2, 3]})
    v2_body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    client.post("/v2/models/double/infer", json=v2_body)
    client.post("/v1/embeddings", json={"model": "embed", "input": "hi"})
    assert _requests("double", "native", "200") == before["native"] + 1
    assert _requests("double", "v2", "200") == before["v2"] + 1
    assert _requests("embed", "openai", "200") == before["openai"] + 1
    # a name that is not served must not become a label
    client.post("/v2/models/unserved-xyz/infer", json=v2_body)
    assert (
        REGISTRY.get_sample_value("binserve_requests_total", {"model": "unserved-xyz", "code": "404", "protocol": "v2"})
        is None
    )


def test_models_says_whether_update_model_may_import_directories(make_client, tmp_path):
    off = make_client().get("/models").get_json()["path_imports"]
    assert off["import_root"] is None and off["note"].startswith("path imports are off (import_root is empty)")
    on = make_client(import_root=str(tmp_path)).get("/models").get_json()["path_imports"]
    assert on == {"import_root": str(tmp_path), "note": None}

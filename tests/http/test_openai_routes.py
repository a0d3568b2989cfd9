"""OpenAI-compatible embeddings and models in process: request shapes, encodings, usage, errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.http.fakes import embed_text


def _post(client, **body):
    return client.post("/v1/embeddings", json=body)


@pytest.mark.parametrize("value", ["hello", ["hello", "a café"]])
def test_text_input_in_float_and_base64(client, value):
    texts = [value] if isinstance(value, str) else value
    expected = np.stack([embed_text(t) for t in texts])
    plain = _post(client, model="embed", input=value, encoding_format="float").get_json()
    assert plain["object"] == "list" and plain["model"] == "embed"
    assert [d["index"] for d in plain["data"]] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([d["embedding"] for d in plain["data"]]), expected, rtol=1e-6)
    packed = _post(client, model="embed", input=value, encoding_format="base64").get_json()
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]])
    np.testing.assert_array_equal(got, expected)
    tokens = sum(len(t.encode()) for t in texts)  # the fake's "tokens" are bytes
    assert plain["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_token_id_inputs(client):
    one = _post(client, model="embed", input=[104, 105]).get_json()
    many = _post(client, model="embed", input=[[104, 105], [99]]).get_json()
    np.testing.assert_allclose(one["data"][0]["embedding"], embed_text("hi"), rtol=1e-6)
    assert len(many["data"]) == 2 and many["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "embed", "input": "x", "dimensions": 2}, 400, "cannot shorten"),
        ({"model": "embed", "input": "x", "encoding_format": "hex"}, 400, "'encoding_format'"),
        ({"model": "embed", "input": "x", "temperature": 1}, 400, "unknown fields ['temperature']"),
        ({"input": "x"}, 400, "'model'"),
        ({"model": "embed"}, 400, "'input' is required"),
        ({"model": "embed", "input": []}, 400, "'input' must be"),
        ({"model": "embed", "input": [1, "a"]}, 400, "'input' must be"),
        ({"model": "double", "input": "x"}, 400, "does not produce embeddings"),
        ({"model": "nope", "input": "x"}, 404, "'nope'"),
    ],
)
def test_errors_have_openais_shape(client, body, status, says):
    resp = _post(client, **body)
    assert resp.status_code == status
    error = resp.get_json()["error"]
    assert says in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_its_own_dimension_count_is_accepted(client):
    assert _post(client, model="embed", input="x", dimensions=4).status_code == 200


def test_non_json_bodies_are_415(client):
    resp = client.post("/v1/embeddings", data=b"input=x", content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 415


def test_generation_routes_refuse_models_that_do_not_generate(client):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": []})):
        resp = client.post(path, json={"model": "embed", **body})
        assert resp.status_code == 400
        assert "does not generate text" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/completions", json={"model": "embed", "prompt": "x", "n": 17})
    assert resp.status_code == 400 and "'n'" in resp.get_json()["error"]["message"]


def test_models_list_and_retrieve(client):
    listed = client.get("/v1/models").get_json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["double", "embed", "shout", "broken"]
    assert all(m["object"] == "model" and m["owned_by"] == "binserve" for m in listed["data"])
    assert client.get("/v1/models/embed").get_json()["id"] == "embed"
    assert client.get("/v1/models/nope").status_code == 404

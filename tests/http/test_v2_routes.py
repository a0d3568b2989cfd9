"""Open Inference Protocol V2 in process: metadata, versions, JSON and binary tensors of every datatype.

Requests are encoded and replies decoded by tritonclient's own code
(`InferenceServerClient.generate_request_body`, `InferResult.from_response_body`), so the wire
format is the real client's, not ours read back by ourselves.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
import tritonclient.http as th

from tests.http.fakes import embed_text


def _infer(client, model, inputs, outputs=None, path=None, **kw):
    body, json_size = th.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return client.post(
        path or f"/v2/models/{model}/infer", data=body, headers=headers
    )  # no Content-Type, as tritonclient


def _result(resp) -> th.InferResult:
    assert resp.status_code == 200, resp.data[:300]
    return th.InferResult.from_response_body(
        resp.data, header_length=resp.headers.get("Inference-Header-Content-Length")
    )


def _input(name, arr, datatype, binary=True):
    t = th.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def test_server_and_model_metadata(client):
    assert client.get("/v2").get_json() == {
        "name": "binserve",
        "version": "0.3.0",
        "extensions": ["binary_tensor_data"],
    }
    meta = client.get("/v2/models/double").get_json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["versions"] == ["1"]
    embed = client.get("/v2/models/embed/versions/1").get_json()
    assert embed["inputs"][0] == {"name": "texts", "datatype": "BYTES", "shape": [-1]}
    assert embed["inputs"][1] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    assert client.get("/v2/models/double/ready").status_code == 200


def test_versions_map_to_the_served_one(client):
    x = np.ones((1, 3), np.float32)
    assert _result(_infer(client, "double", [_input("x", x, "FP32")], path="/v2/models/double/versions/1/infer"))
    resp = _infer(client, "double", [_input("x", x, "FP32")], path="/v2/models/double/versions/2/infer")
    assert resp.status_code == 404 and "in the repository but not served" in resp.get_json()["error"]
    resp = client.get("/v2/models/double/versions/9/ready")
    assert resp.status_code == 404 and "does not exist" in resp.get_json()["error"]


@pytest.mark.parametrize("binary", [True, False])
def test_tensors_in_binary_and_json_give_the_model_output(client, binary):
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    out = [th.InferRequestedOutput("y", binary_data=binary)]
    result = _result(_infer(client, "double", [_input("x", x, "FP32", binary)], outputs=out, request_id="r1"))
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)
    assert result.get_response()["id"] == "r1"
    assert result.get_response()["model_version"] == "1"


def test_json_data_may_be_nested(client):
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}]}
    resp = client.post("/v2/models/double/infer", json=body)
    assert resp.get_json()["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [2, 4, 6, 8, 10, 12]}
    ]


@pytest.mark.parametrize("datatype", ["FP16", "FP64", "BF16"])
def test_other_float_datatypes_are_converted(client, datatype):
    x = np.array([[1.5, -2.25, 3.0]], dtype=np.float32)
    if datatype == "BF16":
        import ml_dtypes  # tritonclient's own BF16 type (a tritonclient dependency)

        t = _input("x", x.astype(ml_dtypes.bfloat16), "BF16")  # the values are exact in bf16
    else:
        t = _input("x", x.astype(np.float16 if datatype == "FP16" else np.float64), datatype)
    np.testing.assert_array_equal(_result(_infer(client, "double", [t])).as_numpy("y"), 2 * x)


def test_a_datatype_of_another_kind_is_refused(client):
    resp = _infer(client, "double", [_input("x", np.ones((1, 3), np.int32), "INT32")])
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "input 'x' has datatype INT32; the model takes FP32"


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_bytes_tensors_are_texts(client, shape):
    texts = ["hello world", "a café", "third"]
    t = _input("texts", np.array(texts, dtype=object).reshape(shape), "BYTES")
    got = _result(_infer(client, "embed", [t])).as_numpy("embeddings")
    np.testing.assert_allclose(got, np.stack([embed_text(s) for s in texts]))


def test_bytes_in_json(client):
    body = {"inputs": [{"name": "texts", "shape": [2], "datatype": "BYTES", "data": ["ab", "c"]}]}
    out = client.post("/v2/models/embed/infer", json=body).get_json()["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(out["shape"]), np.stack([embed_text("ab"), embed_text("c")])
    )


def _raw(header: dict, *blobs: bytes):
    import json

    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def _tensor(name, shape, datatype, size):
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(
    ("header", "blob", "says"),
    [
        # the binary size must match shape x itemsize, and no shape is believed over the bytes sent
        ({"inputs": [_tensor("x", [1, 3], "FP32", 8)]}, b"\0" * 8, "needs 12 bytes"),
        # larger than the shape needs, with every declared byte sent: not read as the first 12
        ({"inputs": [_tensor("x", [1, 3], "FP32", 16)]}, b"\0" * 16, "needs 12 bytes, got 16"),
        ({"inputs": [_tensor("x", [1, 3], "BF16", 8)]}, b"\0" * 8, "needs 6 bytes, got 8"),
        ({"inputs": [_tensor("x", [2**40, 3], "FP32", 12)]}, b"\0" * 12, "needs 13194139533312 bytes"),
        ({"inputs": [_tensor("x", [1, 3], "FP32", 12)]}, b"\0" * 16, "4 bytes of binary data follow"),
        ({"inputs": [_tensor("x", [1, 3], "FP32", 64)]}, b"\0" * 12, "runs past"),
        ({"inputs": [_tensor("texts", [100], "BYTES", 8)]}, b"\0" * 8, "cannot fit"),
        ({"inputs": [_tensor("texts", [1], "BYTES", 8)]}, struct.pack("<I", 100) + b"abcd", "declares 100 bytes"),
        ({"inputs": [_tensor("texts", [1], "BYTES", 6)]}, struct.pack("<I", 2) + b"\xff\xfe", "not valid UTF-8"),
        ({"inputs": [_tensor("x", [1, -3], "FP32", 12)]}, b"\0" * 12, "negative dimension"),
        ({"inputs": [_tensor("x", [1, 3], "FP8", 3)]}, b"\0" * 3, "datatype 'FP8' is not one of"),
        ({"inputs": [_tensor("z", [1, 3], "FP32", 12)]}, b"\0" * 12, "unknown input 'z'"),
        ({"inputs": [_tensor("x", [1, 3], "FP32", 12)], "outputs": [{"name": "y"}] * 2}, b"\0" * 12, "twice"),
        (
            {"inputs": [_tensor("x", [1, 3], "FP32", 12)], "outputs": [{"name": "q"}]},
            b"\0" * 12,
            "unknown outputs ['q']",
        ),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}, b"", "holds 3 elements"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", "b", "c"]}]}, b"", "numbers"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32"}]}, b"", "neither 'data' nor"),
        ({"inputs": []}, b"", "non-empty list"),
        (
            {"inputs": [_tensor("x", [1, 3], "FP32", 12)], "parameters": {"timeout": -5}},
            b"\0" * 12,
            "parameters.timeout",
        ),
    ],
)
def test_malformed_tensors_are_400_naming_the_problem(client, manager, header, blob, says):
    batches = manager.get("double").scheduler.stats()["batches"]
    model = "embed" if header["inputs"] and header["inputs"][0]["name"] == "texts" else "double"
    body, headers = _raw(header, blob)
    resp = client.post(f"/v2/models/{model}/infer", data=body, headers=headers)
    assert resp.status_code == 400, resp.data
    assert says in resp.get_json()["error"]
    assert manager.get("double").scheduler.stats()["batches"] == batches  # no forward pass was spent


def test_a_header_length_outside_the_body_is_400(client):
    resp = client.post("/v2/models/double/infer", data=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert resp.status_code == 400 and "outside the body" in resp.get_json()["error"]


def test_v2_and_native_requests_share_batches(make_client, manager):
    from tests.http.fakes import FakeManager

    slow = FakeManager(max_batch_size=2, max_wait_ms=2000)  # waits for a second request to fill the batch
    try:
        from binserve.config import ServerConfig
        from server import create_app

        app = create_app(ServerConfig(), manager=slow)
        sizes = {}

        def native():
            sizes["native"] = app.test_client().post("/infer/double", json={"x": [1, 2, 3]}).headers["X-Batch-Size"]

        t = threading.Thread(target=native)
        t.start()
        resp = _infer(app.test_client(), "double", [_input("x", np.ones((1, 3), np.float32), "FP32")])
        t.join()
        assert resp.headers["X-Batch-Size"] == "2" and sizes["native"] == "2"
    finally:
        slow.close()


def test_bytes_elements_are_bounded_before_any_is_built(make_client):
    client = make_client(max_queue_samples=4)
    body, headers = _raw({"inputs": [_tensor("texts", [10], "BYTES", 40)]}, b"\0" * 40)  # ten empty texts
    resp = client.post("/v2/models/embed/infer", data=body, headers=headers)
    assert resp.status_code == 413 and "at most 4" in resp.get_json()["error"]

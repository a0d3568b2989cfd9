"""End to end: real Gunicorn on loopback, real MiniLM and policy weights, called with request_tools."""

from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from sentence_transformers import SentenceTransformer

from binary_protocol import binary_to_dict, dict_to_binary
from binserve import errors
from models.examples.policy import PolicyNet
from models.registry import default_minilm_path
from request_tools import InferenceClient, send_inference_request

# What the server promises for its default engines (the accuracy gate): cosine to fp32 >= 0.999.
GATE = 0.999
TEXTS = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'} and more" for i in range(64)]


@pytest.fixture(scope="module")
def reference():
    """The same weights run directly by sentence-transformers (an independent implementation)."""
    return SentenceTransformer(default_minilm_path(), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_one_text_matches_the_model_run_directly(server, reference):
    out = send_inference_request({"texts": [TEXTS[0]]}, f"{server.base_url}/infer")
    assert out["embeddings"].shape == (1, 384) and out["embeddings"].dtype == np.float32
    assert cosines(out["embeddings"], reference.encode([TEXTS[0]]))[0] >= GATE


def test_64_texts_in_one_request_match(server, reference):
    out = send_inference_request({"texts": TEXTS}, f"{server.base_url}/infer/minilm")
    assert out["embeddings"].shape == (64, 384)
    assert cosines(out["embeddings"], reference.encode(TEXTS)).min() >= GATE


def test_single_text_reply_mirrors_the_request(server):
    out = send_inference_request({"texts": "just one"}, f"{server.base_url}/infer")
    assert out["embeddings"].shape == (384,)


def test_concurrent_requests_are_batched(server, reference):
    with InferenceClient(server.base_url) as client, ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(lambda t: client.request({"texts": [t]}), TEXTS))
    sizes = [r.batch_size for r in replies]
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"
    got = np.concatenate([r.outputs["embeddings"] for r in replies])
    assert cosines(got, reference.encode(TEXTS)).min() >= GATE  # batching changed no result
    for reply in replies:  # every stage of the account, from the event loop on, in order
        stages = [part.split(";dur=") for part in reply.headers["Server-Timing"].split(", ")]
        assert [name for name, _ in stages] == ["wait", "parse", "decode", "queue", "infer", "encode"]
        assert all(float(ms) >= 0 for _, ms in stages)


def test_framed_plain_pickle_and_json_agree(server):
    payload = {"texts": ["the same text in three formats"]}
    framed = send_inference_request(payload, f"{server.base_url}/infer")["embeddings"]
    r = requests.post(
        f"{server.base_url}/infer",
        data=pickle.dumps(payload, protocol=5),
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/octet-stream"
    plain = pickle.loads(r.content)["embeddings"]  # the test trusts this server's reply
    r = requests.post(f"{server.base_url}/infer", json=payload, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    as_json = np.asarray(r.json()["embeddings"], dtype=np.float32)
    # three requests, three batches: the plan may run them on different engines (and now and then
    # on an alternative it re-checks), so they agree within the accuracy gate, not bit for bit
    assert cosines(framed, plain).min() >= GATE and cosines(framed, as_json).min() >= GATE


def test_accept_header_picks_the_reply_format(server):
    r = requests.post(
        f"{server.base_url}/infer", json={"texts": ["x"]}, headers={"Accept": "application/x-binserve"}, timeout=30
    )
    assert r.headers["Content-Type"] == "application/x-binserve"
    assert binary_to_dict(r.content)["embeddings"].shape == (1, 384)


def test_token_ids_path(server):
    with InferenceClient(server.base_url) as client:
        from_text = client.infer({"texts": ["hello world"]})["embeddings"]
        ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in MiniLM's vocabulary
        from_ids = client.infer({"input_ids": [ids]})["embeddings"]
    np.testing.assert_allclose(from_text, from_ids, atol=1e-5)


def test_policy_model_over_http(server):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 255, (4, 480, 640, 3), dtype=np.uint8)
    state = rng.standard_normal((4, 6)).astype(np.float32)
    out = send_inference_request({"image": image, "state": state}, f"{server.base_url}/infer/policy")
    net = PolicyNet()
    from safetensors.torch import load_file

    net.load_state_dict(load_file("models/policy_v1/model.safetensors"))
    with torch.inference_mode():
        direct = net(torch.from_numpy(image), torch.from_numpy(state)).numpy()
    np.testing.assert_allclose(out["action"], direct, rtol=1e-2, atol=1e-3)  # the policy's accuracy gate


@pytest.mark.parametrize(
    "model,payload,cls,message",
    [
        (None, {"text": ["wrong key"]}, errors.InvalidInput, "expected 'texts'"),
        (None, {"texts": []}, errors.InvalidInput, "'texts' is an empty list"),
        (None, {"input_ids": np.array([1.5, 2.5])}, errors.InvalidInput, "dtype float64, expected int64"),
        (
            "policy",
            {"image": np.zeros((48, 64, 3), np.uint8), "state": np.zeros(6, np.float32)},
            errors.InvalidInput,
            "'image' has shape (48, 64, 3)",
        ),
        (
            "policy",
            {"image": np.zeros((480, 640, 3), np.float32) + 0.5, "state": np.zeros(6, np.float32)},
            errors.InvalidInput,
            "'image' has dtype float32",
        ),
        ("nope", {"texts": ["x"]}, errors.ModelNotFound, "model 'nope' is not served here"),
    ],
)
def test_bad_inputs_get_clear_errors_and_change_nothing(server, model, payload, cls, message):
    with pytest.raises(cls) as info:
        send_inference_request(payload, f"{server.base_url}/infer", model=model, retries=0)
    assert message in info.value.message
    assert send_inference_request({"texts": ["still serving"]}, f"{server.base_url}/infer")["embeddings"].shape == (
        1,
        384,
    )


def test_hostile_pickle_is_refused_over_http(server, tmp_path):
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    r = requests.post(
        f"{server.base_url}/infer",
        data=pickle.dumps({"texts": Exploit()}, protocol=5),
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "protocol_error"
    assert "system' is not allowed" in r.json()["error"]["message"]
    assert not sentinel.exists()


def test_bad_content_type_and_garbage(server):
    r = requests.post(f"{server.base_url}/infer", data=b"hello", headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "text/plain" in r.json()["error"]["message"]
    r = requests.post(
        f"{server.base_url}/infer",
        data=b"\x00garbage",
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "protocol_error"
    r = requests.post(
        f"{server.base_url}/infer", data=b'{"texts": ', headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]


def test_a_bad_request_does_not_fail_its_batch_mates(server):
    """Good and bad requests sent together: every good one succeeds, every bad one gets its 400."""
    good = {"texts": ["fine"]}
    bad = {"texts": [123]}
    with InferenceClient(server.base_url, retries=0) as client, ThreadPoolExecutor(32) as pool:

        def call(i):
            try:
                return client.infer(bad if i % 4 == 0 else good)["embeddings"].shape
            except errors.InvalidInput as exc:
                return exc.status_code

        results = list(pool.map(call, range(64)))
    assert results.count(400) == 16 and results.count((1, 384)) == 48


def test_deadline_header_is_validated(server):
    r = requests.post(
        f"{server.base_url}/infer", json={"texts": ["x"]}, headers={"X-Request-Timeout-Ms": "soon"}, timeout=30
    )
    assert r.status_code == 400 and "X-Request-Timeout-Ms" in r.json()["error"]["message"]


def test_models_healthz_readyz(server):
    info = requests.get(f"{server.base_url}/models", timeout=10).json()
    by_name = {m["name"]: m for m in info["models"]}
    assert info["default"] == "minilm" and set(by_name) == {"minilm", "policy"}
    m = by_name["minilm"]
    assert m["adapter"] == "hf_encoder" and m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["parameters"] == 22_713_216 and m["batching"]["max_batch_size"] == 32
    assert by_name["policy"]["inputs"]["image"] == {"dtype": "uint8", "shape": [480, 640, 3]}
    assert requests.get(f"{server.base_url}/healthz", timeout=10).json()["status"] == "ok"
    assert requests.get(f"{server.base_url}/readyz", timeout=10).status_code == 200
    r = requests.get(f"{server.base_url}/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert json.loads(requests.get(f"{server.base_url}/infer", timeout=10).content)["error"]["type"] == (
        "method_not_allowed"
    )


def test_framed_body_built_by_hand_works(server):
    body = dict_to_binary({"texts": ["raw requests client"]})
    r = requests.post(
        f"{server.base_url}/infer", data=body, headers={"Content-Type": "application/x-binserve"}, timeout=30
    )
    assert r.status_code == 200 and int(r.headers["X-Batch-Size"]) >= 1 and r.headers["X-Model-Version"] == "1"


def test_the_default_runtime_plan_is_shown_and_its_export_cached_with_the_version(server):
    info = requests.get(f"{server.base_url}/models", timeout=10).json()
    minilm = next(m for m in info["models"] if m["name"] == "minilm")
    plan = minilm["runtime"]["plan"]
    assert plan and plan[-1]["max_batch"] is None and minilm["engines"] == [s["engine"] for s in plan]
    candidates = {c["engine"]: c for c in minilm["runtime"]["candidates"]}
    for step in plan:
        assert candidates[step["engine"]]["used"]
    cache = server.repository / "minilm" / "1" / ".cache"
    if any(e.startswith("onnx") for e in minilm["engines"]):
        assert list(cache.glob("*-fp32.onnx")), "the ONNX export is not cached with the version"
    assert list(cache.glob("*-plan.json")), "the plan's record is not cached with the version"

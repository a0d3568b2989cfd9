"""Fan-out and model control with real weights on real Gunicorn: MiniLM plus two classifiers built
from MiniLM's encoder with seeded heads (models/examples/classifier.py)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as th

from models.examples.classifier import TOPICS, TOXICITY, write_classifier
from models.registry import default_minilm_path
from tests.serverproc import ServerProcess

TEXTS = ["Stocks fell sharply on Tuesday.", "The team won the final match.", "you are an idiot", "hi there"]
ADMIN = {"Authorization": "Bearer adm1n"}
MODELS = ("minilm", "topics", "toxicity")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("fanout")
    topics = write_classifier(root / "topics", TOPICS, seed=0)
    toxicity = write_classifier(root / "toxicity", TOXICITY, multi_label=True, seed=1)
    fp32 = ";runtime=torch;precision=fp32"  # the classifiers' plan: the reference only (quick to load)
    models = (
        f"minilm=hf_encoder:{default_minilm_path()},topics=hf_encoder:{topics}{fp32},"
        f"toxicity=hf_encoder:{toxicity}{fp32}"
    )
    with ServerProcess(workers=2, models=models, admin_token="adm1n", max_wait_ms=20, repository_poll_ms=200) as s:
        yield s


def _post(srv, body, path="/infer"):
    return requests.post(f"{srv.base_url}{path}", json=body, timeout=60)


def _batch_sizes(resp) -> dict[str, int]:
    return {k: int(v) for k, v in (p.split("=") for p in resp.headers["X-Batch-Size"].split(","))}


def test_fan_out_equals_each_model_alone(srv):
    both = _post(srv, {"texts": TEXTS, "models": list(MODELS)})
    assert both.status_code == 200, both.text
    reply = both.json()
    for name in MODELS:
        alone = _post(srv, {"texts": TEXTS}, f"/infer/{name}").json()
        assert alone.pop("status") == "ok"  # a one-model reply's; a fan-out nests the outputs only
        assert set(reply[name]) == set(alone)
        for key, value in alone.items():
            if key == "labels":
                assert reply[name][key] == value
            elif key == "scores":  # ragged for the multi-label model
                for got, want in zip(reply[name][key], value, strict=True):
                    np.testing.assert_allclose(got, want, atol=1e-6)
            else:
                np.testing.assert_allclose(reply[name][key], value, atol=1e-6)
    assert reply["topics"]["labels"] == [[TOPICS[i]] for i in np.argmax(reply["topics"]["probabilities"], 1)]


def test_labels_top_k_threshold_and_multi_label_over_http(srv):
    body = {"texts": TEXTS, "models": ["topics", "toxicity"], "params": {"topics": {"top_k": 2}}}
    reply = _post(srv, body).json()
    for probs, labels in zip(reply["topics"]["probabilities"], reply["topics"]["labels"], strict=True):
        assert labels == [TOPICS[i] for i in np.argsort(probs)[::-1][:2]]
    for probs, labels in zip(reply["toxicity"]["probabilities"], reply["toxicity"]["labels"], strict=True):
        assert sorted(labels) == sorted(TOXICITY[i] for i, p in enumerate(probs) if p >= 0.5)
    high = _post(srv, {"texts": TEXTS, "threshold": 0.9}, "/infer/toxicity").json()
    assert all(s >= 0.9 for scores in high["scores"] for s in scores)


def test_rows_of_different_requests_share_batches_per_model(srv):
    rng = random.Random(3)
    subsets = [["minilm", *rng.sample(MODELS[1:], rng.randint(0, 2))] for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda m: _post(srv, {"texts": [TEXTS[0]], "models": m}), subsets))
    assert all(r.status_code == 200 for r in replies)
    assert max(_batch_sizes(r)["minilm"] for r in replies) > 1  # one text each, batched with others


def test_unload_and_load_under_load_fail_no_request_for_the_models_that_stay(srv):
    stop, failures, done = threading.Event(), [], [0]

    def traffic():
        while not stop.is_set():
            r = _post(srv, {"texts": TEXTS[:2], "models": ["minilm", "topics"]})
            if r.status_code != 200:
                failures.append((r.status_code, r.text))
            done[0] += 1

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        r = requests.post(f"{srv.base_url}/v2/repository/models/toxicity/unload", headers=ADMIN, timeout=120)
        assert r.status_code == 200 and r.json()["converged"], r.text
        gone = _post(srv, {"texts": TEXTS}, "/infer/toxicity")
        assert gone.status_code == 404 and "unloaded" in gone.json()["error"]["message"]
        index = requests.post(f"{srv.base_url}/v2/repository/index", headers=ADMIN, timeout=10).json()
        tox = next(m for m in index if m["name"] == "toxicity")
        assert tox["state"] == "UNAVAILABLE" and tox["reason"] == "unloaded (model control)" and not tox["workers"]
        r = requests.post(f"{srv.base_url}/v2/repository/models/toxicity/load", headers=ADMIN, timeout=120)
        assert r.status_code == 200 and r.json()["converged"], r.text
        assert len(r.json()["workers"]) == srv.workers
        assert _post(srv, {"texts": TEXTS}, "/infer/toxicity").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and done[0] > 0


def test_tritonclient_model_control(srv):
    client = th.InferenceServerClient(srv.base_url.removeprefix("http://"))
    try:
        index = {m["name"]: m for m in client.get_model_repository_index(headers=ADMIN)}
        assert set(index) == set(MODELS) and index["minilm"]["state"] == "READY"
        client.unload_model("topics", headers=ADMIN)
        assert not client.is_model_ready("topics")
        client.load_model("topics", headers=ADMIN)
        assert client.is_model_ready("topics")
    finally:
        client.close()


def test_model_control_needs_the_admin_token(srv):
    assert requests.post(f"{srv.base_url}/v2/repository/index", timeout=10).status_code == 401
    r = requests.post(f"{srv.base_url}/v2/repository/models/topics/unload", headers={"Authorization": "Bearer x"})
    assert r.status_code == 403
    r = requests.post(f"{srv.base_url}/v2/repository/models/nope/load", headers=ADMIN, timeout=10)
    assert r.status_code == 404 and "not in the repository" in r.json()["error"]

"""Fan-out in process: one request to several models, all or nothing, per-model headers and metrics."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import REGISTRY

from binary_protocol import binary_to_dict, dict_to_binary
from binserve.config import ServerConfig
from server import create_app
from tests.http.fakes import FakeManager, embed_text

TEXTS = ["one text", "another"]


def test_each_model_answers_as_it_would_alone(client):
    both = client.post("/infer", json={"texts": TEXTS, "models": ["embed", "shout"]})
    assert both.status_code == 200
    reply = both.get_json()
    assert set(reply) == {"embed", "shout"}
    for name in ("embed", "shout"):
        alone = client.post(f"/infer/{name}", json={"texts": TEXTS}).get_json()
        assert reply[name] | {"status": "ok"} == alone  # a fan-out nests the outputs only
    np.testing.assert_allclose(reply["shout"]["embeddings"][0], embed_text("ONE TEXT"), rtol=1e-6)


def test_headers_name_every_model(client):
    resp = client.post("/infer", json={"texts": TEXTS, "models": ["embed", "shout"]})
    assert resp.headers["X-Model"] == "embed,shout"
    assert resp.headers["X-Model-Version"] == "embed=1,shout=1"
    assert resp.headers["X-Batch-Size"] == "embed=2,shout=2"
    phases = [p.split(";")[0] for p in resp.headers["Server-Timing"].split(", ")]
    assert phases == ["decode", "queue-embed", "infer-embed", "queue-shout", "infer-shout", "encode"]


def test_framed_fan_out_replies_nest_per_model(client):
    body = dict_to_binary({"texts": TEXTS, "models": ["embed", "shout"]})
    resp = client.post("/infer", data=body, content_type="application/x-binserve")
    reply = binary_to_dict(resp.data)
    assert reply["embed"]["embeddings"].shape == (2, 4) and reply["shout"]["embeddings"].dtype == np.float32


def test_a_failing_model_fails_only_the_requests_that_asked_for_it():
    manager = FakeManager(max_batch_size=8, max_wait_ms=300)  # concurrent requests share batches
    try:
        app = create_app(ServerConfig(), manager=manager)
        replies = {}

        def call(key, models):
            resp = app.test_client().post("/infer", json={"texts": TEXTS, "models": models})
            replies[key] = resp

        threads = [
            threading.Thread(target=call, args=("with", ["embed", "broken"])),
            threading.Thread(target=call, args=("without", ["embed", "shout"])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert replies["without"].status_code == 200
        assert replies["without"].headers["X-Batch-Size"].startswith("embed=4")  # embed rows were batched together
        failed = replies["with"]
        assert failed.status_code == 500
        assert failed.get_json()["error"]["message"].startswith("model 'broken': ")
        assert "the fake model is broken" not in failed.get_json()["error"]["message"]  # no internals
    finally:
        manager.close()


def test_a_failed_part_cancels_the_parts_still_queued_on_other_models():
    """shout's batcher is busy with another request's batch when a fan-out to [broken, shout]
    arrives: broken fails at once, and the fan-out's shout part, still queued, never runs."""
    manager = FakeManager()
    shout = manager.get("shout").adapter
    started, release, ran = threading.Event(), threading.Event(), []
    real_run = type(shout).run

    def gated(samples):
        ran.append([bytes(s).decode() for s in samples])
        started.set()
        release.wait(30)  # the other request's batch takes a while
        return real_run(shout, samples)

    shout.run = gated
    try:
        app = create_app(ServerConfig(), manager=manager)
        busy = {}
        other = threading.Thread(
            target=lambda: busy.update(r=app.test_client().post("/infer/shout", json={"texts": ["the busy batch"]}))
        )
        other.start()
        assert started.wait(10)
        failed = app.test_client().post("/infer", json={"texts": ["fanned out"], "models": ["broken", "shout"]})
        release.set()
        other.join(30)
        assert failed.status_code == 500 and failed.get_json()["error"]["message"].startswith("model 'broken': ")
        assert busy["r"].status_code == 200
        # shout ran only the other request's batch; give its batcher the chance to run anything left
        assert app.test_client().post("/infer/shout", json={"texts": ["after"]}).status_code == 200
        assert ran == [["the busy batch"], ["after"]], ran
    finally:
        release.set()
        manager.close()


def test_bad_fan_outs_are_400_and_run_nothing(client, manager):
    before = manager.get("embed").scheduler.stats()["batches"]
    cases = [
        ({"texts": TEXTS, "models": []}, "non-empty list"),
        ({"texts": TEXTS, "models": ["embed", "embed"]}, "twice"),
        ({"texts": TEXTS, "models": ["embed"] + [f"m{i}" for i in range(20)]}, "at most 16"),
        ({"texts": TEXTS, "models": ["embed", "double"]}, "model 'double': expected exactly 'x'"),
        ({"texts": TEXTS, "models": ["embed"], "params": {"shout": {}}}, "does not: ['shout']"),
        ({"texts": TEXTS, "models": ["embed"], "params": {"embed": 3}}, "'params' must map"),
    ]
    for body, says in cases:
        resp = client.post("/infer", json=body)
        assert resp.status_code == 400, body
        assert says in resp.get_json()["error"]["message"], resp.get_json()
    assert client.post("/infer", json={"texts": TEXTS, "models": ["embed", "nope"]}).status_code == 404
    assert client.post("/infer/embed", json={"texts": TEXTS, "models": ["embed"]}).status_code == 400
    assert manager.get("embed").scheduler.stats()["batches"] == before


def test_params_reach_only_their_model(client):
    # `x` for double, texts for embed: each model gets the shared inputs plus its own params
    resp = client.post("/infer", json={"texts": TEXTS, "models": ["embed"], "params": {"embed": {"texts": ["z"]}}})
    np.testing.assert_allclose(resp.get_json()["embed"]["embeddings"][0], embed_text("z"), rtol=1e-6)


def _count(model: str, code: str) -> float:
    labels = {"model": model, "code": code, "protocol": "native"}
    return REGISTRY.get_sample_value("binserve_requests_total", labels) or 0


def test_each_model_of_a_fan_out_counts_the_request(client):
    before = _count("embed", "200"), _count("shout", "200")
    client.post("/infer", json={"texts": TEXTS, "models": ["embed", "shout"]})
    assert (_count("embed", "200"), _count("shout", "200")) == (before[0] + 1, before[1] + 1)


def _cache_count(model: str, result: str) -> float:
    return REGISTRY.get_sample_value("binserve_cache_requests_total", {"model": model, "result": result}) or 0.0


def test_a_fan_out_is_answered_from_the_cache_model_by_model(make_client):
    """The fan-out takes the same core as a one-model request: each model's part is looked up and
    kept under that model's own entry, so a repeat is a hit for every part (no batch), and a
    one-model request with the same input hits the entry the fan-out left."""
    c = make_client(response_cache_bytes=1 << 20)
    body = {"texts": ["fan me out"], "models": ["embed", "shout"]}
    hits_before = _cache_count("shout", "hit")
    first = c.post("/infer", json=body)
    again = c.post("/infer", json=body)
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit")
    assert again.headers["X-Batch-Size"] == "embed=0,shout=0" and again.json == first.json
    assert _cache_count("shout", "hit") == hits_before + 1
    alone = c.post("/infer/shout", json={"texts": ["fan me out"]})
    assert alone.headers["X-Cache"] == "hit" and alone.json == first.json["shout"] | {"status": "ok"}


def test_a_fan_out_part_a_reload_overtook_is_not_cached(make_client, manager):
    """A part looked up under version 1 that ran on version 2 (a reload landed while it waited) leaves
    no entry: neither version could be answered from it."""
    c = make_client(response_cache_bytes=1 << 20)
    shout = manager.get("shout").adapter
    real_run = type(shout).run

    def reloaded_meanwhile(self, samples):
        self.version = "2"  # the batch ran on the new version: its tag says 2
        return real_run(self, samples)

    body = {"texts": ["overtaken"], "models": ["embed", "shout"]}
    type(shout).run = reloaded_meanwhile
    try:
        first = c.post("/infer", json=body)
    finally:
        type(shout).run = real_run
    assert first.status_code == 200 and first.headers["X-Model-Version"] == "embed=1,shout=2"
    shout.version = "1"
    try:
        again = c.post("/infer", json=body)
        assert again.headers["X-Cache"] == "miss"  # embed's part hit, shout's was never stored
        assert again.headers["X-Batch-Size"] == "embed=0,shout=1"
    finally:
        shout.version = "1"


def test_a_fan_out_naming_one_model_answers_as_a_fan_out(client):
    """`models: [one]` is still a fan-out: the reply nests under the model's name and the headers
    are per model (`name=value`), as its clients parse them - though the core serves it as it serves
    a one-model request."""
    resp = client.post("/infer", json={"texts": TEXTS, "models": ["embed"]})
    assert resp.status_code == 200 and set(resp.get_json()) == {"embed"}
    assert resp.headers["X-Batch-Size"] == "embed=2" and resp.headers["X-Model-Version"] == "embed=1"
    assert [p.split(";")[0] for p in resp.headers["Server-Timing"].split(", ")] == [
        "decode", "queue-embed", "infer-embed", "encode"
    ]  # fmt: skip
    broken = client.post("/infer", json={"texts": TEXTS, "models": ["broken"]})
    assert broken.status_code == 500 and broken.get_json()["error"]["message"].startswith("model 'broken': ")

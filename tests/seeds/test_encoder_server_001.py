"""Document 001, the encoder model server: its `encoder-server` command lines and its `requests`
examples, as written, against real Gunicorn, with hub ids resolved from a local Hugging Face cache.

The cache is laid out as the hub client writes it (`models--org--name/refs/main` naming a snapshot
under `snapshots/`) and holds two tiny classifiers named as the document's scorers (MiniLM's encoder
under a seeded head: models/examples/classifier.py). Nothing is downloaded.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models.examples.classifier import write_classifier
from tests.seeds.conftest import VERBATIM, code_block, document, port_free
from tests.serverproc import ServerProcess

PORT = 8000  # the document's default, and what its examples call
FLUENCY, BIAS = "wandb/WeaveFluencyScorerV1", "wandb/WeaveBiasScorerV1"
ENCODER_SERVER = str(Path(sys.executable).parent / "encoder-server")
API_USAGE = VERBATIM / "encoder_001" / "api_usage.py"


def cache_model(hub: Path, repo_id: str, labels: list[str], seed: int) -> Path:
    """A classifier in the hub client's cache layout; its snapshot directory."""
    commit = f"{seed:040x}"
    root = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = write_classifier(root / "snapshots" / commit, labels, seed=seed)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    return {"cache": cache, FLUENCY: cache_model(cache, FLUENCY, ["fluent", "not_fluent"], 1),
            BIAS: cache_model(cache, BIAS, ["unbiased", "biased"], 2)}  # fmt: skip


@pytest.fixture(scope="module")
def encoder_server(hub, tmp_path_factory):
    if not port_free(PORT):
        pytest.fail(f"port {PORT} (the document's) is taken on this machine")
    # the document's "multiple models" command, run from a directory of the user's own
    command = [ENCODER_SERVER, "--models", f"{FLUENCY},{BIAS}"]
    srv = ServerProcess(command=command, port=PORT, workers=1, env={"HF_HUB_CACHE": str(hub["cache"])},
                        model_repository=tmp_path_factory.mktemp("repo"))  # fmt: skip
    with srv:
        yield srv


def reference(snapshot: Path, texts: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(snapshot)
    model = AutoModelForSequenceClassification.from_pretrained(snapshot).eval()
    with torch.inference_mode():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1).numpy()


def test_the_copy_is_the_documents_own():
    assert API_USAGE.read_text() == code_block(document("001"), "### API Usage")


def test_the_documents_requests_examples_answer_its_shapes(encoder_server, hub):
    ns = runpy.run_path(str(API_USAGE))  # as written: http://localhost:8000/predict
    result, results, named = ns["result"], ns["results"], ns["response"].json()
    assert set(result) == {"request_id", "results", "processing_time", "model_used"}
    assert result["model_used"] == FLUENCY  # the first of --models is the default
    one = result["results"]
    assert set(one) == {"prediction", "probabilities", "text"} and one["text"] == "This is a sample text to classify"
    expected = reference(hub[FLUENCY], [one["text"]])[0]
    assert one["prediction"] == int(np.argmax(expected))
    np.testing.assert_allclose(one["probabilities"], expected, atol=0.02)  # the engine passed the gate against fp32
    assert isinstance(results["results"], list) and [r["text"] for r in results["results"]] == ["Text 1", "Text 2",
                                                                                                  "Text 3"]  # fmt: skip
    np.testing.assert_allclose([r["probabilities"] for r in results["results"]],
                               reference(hub[FLUENCY], ["Text 1", "Text 2", "Text 3"]), atol=0.02)  # fmt: skip
    assert named["model_used"] == FLUENCY and 0 < named["processing_time"] < 30
    bias = requests.post(f"{encoder_server.base_url}/predict", json={"texts": "Sample text", "model_name": BIAS},
                         timeout=30).json()  # fmt: skip
    assert bias["model_used"] == BIAS
    np.testing.assert_allclose(bias["results"]["probabilities"], reference(hub[BIAS], ["Sample text"])[0], atol=0.02)


def test_health_and_models_answer_the_documents_shapes(encoder_server):
    requests.post(f"{encoder_server.base_url}/predict", json={"texts": ["a", "b"]}, timeout=30).raise_for_status()
    health = requests.get(f"{encoder_server.base_url}/health", timeout=10).json()
    assert health["status"] == "healthy" and health["models_loaded"] == [FLUENCY, BIAS]
    stats = health["stats"][FLUENCY]
    assert stats["total_requests"] >= 1 and stats["total_batches"] >= 1 and stats["avg_batch_size"] >= 1
    assert stats["avg_latency"] > 0
    assert stats["throughput"] == pytest.approx(stats["avg_batch_size"] / stats["avg_latency"], rel=1e-2)
    listing = requests.get(f"{encoder_server.base_url}/models", timeout=10).json()
    assert set(listing) == {FLUENCY, BIAS}
    entry = listing[FLUENCY]
    assert set(entry) == {"num_parameters", "device", "dtype"} and entry["device"] == "cpu"
    assert entry["num_parameters"] > 20_000_000 and entry["dtype"] in ("torch.float32", "torch.bfloat16")
    # a hub id is the model's name on binserve's own routes too
    native = requests.post(f"{encoder_server.base_url}/infer/{BIAS}", json={"texts": ["x"]}, timeout=30).json()
    assert native["labels"][0][0] in ("unbiased", "biased")


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"texts": 7}, 400, "'texts'"),
    ({"texts": []}, 400, "'texts'"),
    ({"texts": "x", "max_length": 0}, 400, "'max_length'"),
    ({"texts": "x", "max_length": "long"}, 400, "'max_length'"),
    ({"texts": "x", "model_name": 3}, 400, "'model_name'"),
    ({"texts": "x", "model_name": "wandb/Nope"}, 404, "'wandb/Nope'"),
    ({"texts": "x", "temperature": 1}, 400, "temperature"),
    ({"text": "x"}, 400, "texts"),
    ({"image": "aGVsbG8="}, 404, "takes images"),
])  # fmt: skip
def test_bad_requests_are_a_4xx_naming_the_field(encoder_server, body, status, names):
    r = requests.post(f"{encoder_server.base_url}/predict", json=body, timeout=30)
    assert r.status_code == status and names in r.json()["error"]["message"], r.text


def test_max_length_cuts_a_text_as_the_document_says(encoder_server, hub):
    long = "word " * 300
    cut = requests.post(f"{encoder_server.base_url}/predict", json={"texts": long, "max_length": 8}, timeout=30)
    tok = AutoTokenizer.from_pretrained(hub[FLUENCY])
    eight = tok.decode(tok(long, truncation=True, max_length=8)["input_ids"], skip_special_tokens=True)
    same = requests.post(f"{encoder_server.base_url}/predict", json={"texts": eight}, timeout=30)
    np.testing.assert_allclose(cut.json()["results"]["probabilities"], same.json()["results"]["probabilities"],
                               atol=1e-5)  # fmt: skip


def test_a_hub_id_missing_from_the_cache_is_refused_naming_the_cache(tmp_path):
    r = subprocess.run([ENCODER_SERVER, "--models", "wandb/WeaveToxicityScorerV1", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert f"not in the Hugging Face cache {tmp_path}" in r.stderr and "huggingface-cli download" in r.stderr


def test_benchmark_prints_single_against_batched(hub):
    r = subprocess.run([ENCODER_SERVER, "--models", FLUENCY, "--benchmark", "--benchmark-texts", "16",
                        "--max-batch-size", "8", "--disable-compile"],
                       env={**os.environ, "HF_HUB_CACHE": str(hub["cache"])},
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith(f"{FLUENCY}: single"))
    assert "req/s; batched" in line and "x speedup" in line
    assert "--disable-compile: torch.compile is left out of the engines" in r.stdout  # and config_for: test_candidates

"""Document 000, the capability server: its curl and aiohttp examples as written, scores equal to
transformers run directly, and the batching it promises, read from /stats, against real Gunicorn.

The LLM is the example causal LM (a tiny random Llama: the scores are real computations on
meaningless weights), served as `lm`; `--config topics.json` names it and four topics.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from transformers import AutoModelForCausalLM, AutoTokenizer

from classify_client import ClassifyClient
from models.examples.causal_lm import write_causal_lm
from models.lm_scoring import reference_logprobs
from tests.seeds.conftest import VERBATIM, code_block, document, port_free
from tests.serverproc import ServerProcess

PORT = 8000  # the document's examples call localhost:8000
EXAMPLES = VERBATIM / "classify_000"
TOPICS = [{"name": "training", "description": "courses, workshops and learning"},
          {"name": "billing", "description": "invoices, payments and refunds"},
          {"name": "outage", "description": "systems down or slow"},
          {"name": "praise", "description": "thanks and compliments"}]  # fmt: skip
TEXTS = [f"message {i}: " + " ".join(["the training was excellent", "my invoice is wrong", "the site is down",
                                       "thanks a lot"][i % 4].split()[: 2 + i % 3]) for i in range(32)]  # fmt: skip


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return write_causal_lm(tmp_path_factory.mktemp("cls") / "lm", layers=2, hidden=64)


@pytest.fixture(scope="module")
def topics_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "topics.json"
    path.write_text(json.dumps({
        "model": "lm", "topics": TOPICS,
        "recommendations": {"max_tokens": 8},
        "alerts": {"rules": [{"topic": "outage", "threshold": 0.2, "message": "outage at {score:.2f}"}],
                   "judge": {"question": "Is the customer angry?", "message": "angry customer"}},
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def srv(lm, topics_file, tmp_path_factory):
    if not port_free(PORT):
        pytest.fail(f"port {PORT} (the document's) is taken on this machine")
    with ServerProcess(port=PORT, workers=1, models=f"lm=hf_causal_lm:{lm}", config=topics_file,
                       batch_timeout=0.1, batch_size=25, gpu_list="0", max_length=512,
                       model_repository=tmp_path_factory.mktemp("repo")) as server:  # fmt: skip
        yield server


def reference(lm_dir, texts: list[str]) -> np.ndarray:
    """Topic probabilities from transformers directly: one unpadded forward per text and topic."""
    from binserve.capabilities.config import DEFAULT_CLASSIFY_PROMPT, CapabilityConfig

    cfg = CapabilityConfig.parse({"model": "lm", "topics": TOPICS})
    tok, model = AutoTokenizer.from_pretrained(lm_dir), AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    out = []
    for text in texts:
        prefix = tok(DEFAULT_CLASSIFY_PROMPT.format(text=text, topics=cfg.topics_text())).input_ids
        ll = np.array([reference_logprobs(model, prefix, tok(" " + t["name"], add_special_tokens=False).input_ids)
                       for t in TOPICS])  # fmt: skip
        e = np.exp(ll - ll.max())
        out.append(e / e.sum())
    return np.array(out)


def scores_of(result: dict) -> dict[str, float]:
    return {t["name"]: t["score"] for t in result["classification"]["topics"]}


def classify(texts, capabilities=("classification",)) -> dict:
    r = requests.post(f"http://127.0.0.1:{PORT}/classify", json={"texts": list(texts), "capabilities":
                                                                 list(capabilities)}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_the_copies_are_the_documents_own():
    doc = document("000")
    test_it = code_block(doc, "### 3. Test It", "bash")
    assert (EXAMPLES / "curl.sh").read_text() == test_it[test_it.index("# Option C: Direct curl"):]
    for name, heading in (("basic_classification.py", "### Basic Classification"),
                          ("multiple_capabilities.py", "### Multiple Capabilities"),
                          ("concurrent_requests.py", "### Concurrent Requests (Server Batches Them!)")):  # fmt: skip
        assert (EXAMPLES / name).read_text() == code_block(doc, heading), name


def test_the_documents_curl_runs_as_written(srv):
    run = subprocess.run(["bash", str(EXAMPLES / "curl.sh")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert [r["text"] for r in reply["results"]] == ["Test text"] and set(reply["results"][0]) == {"text",
                                                                                                 "classification"}


def _run_async(path, namespace: dict):
    """A document snippet with top-level `await`, run as written in `namespace`."""
    code = compile(path.read_text(), str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

    async def main():
        async with ClassifyClient("http://localhost:8000") as client:
            namespace["client"] = client
            made = eval(code, namespace)  # noqa: S307 - the document's own example, from this repository
            if made is not None:
                await made
            if "classify" in namespace and asyncio.iscoroutinefunction(namespace["classify"]):
                await namespace["classify"]()

    asyncio.run(main())
    return namespace


def test_the_documents_aiohttp_examples_run_as_written(srv, lm, capsys):
    _run_async(EXAMPLES / "basic_classification.py", {})
    printed = capsys.readouterr().out
    assert "'results'" in printed and "The training was excellent!" in printed
    ns = _run_async(EXAMPLES / "multiple_capabilities.py", {})
    result = ns["result"]
    assert [r["text"] for r in result["results"]] == ["Text 1", "Text 2"]
    for r in result["results"]:
        assert set(r) == {"text", "classification", "recommendations", "alerts"}
        assert isinstance(r["recommendations"]["text"], str) and len(r["recommendations"]["topics"]) == 2
    ns = _run_async(EXAMPLES / "concurrent_requests.py", {"asyncio": asyncio, "my_texts": TEXTS[:8]})
    assert [r["results"][0]["text"] for r in ns["results"]] == TEXTS[:8]


def test_scores_equal_transformers_run_directly(srv, lm):
    reply = classify(TEXTS[:6])
    want = reference(lm, TEXTS[:6])
    names = [t["name"] for t in TOPICS]
    for r, w in zip(reply["results"], want, strict=True):
        got = scores_of(r)
        np.testing.assert_allclose([got[n] for n in names], w, atol=1e-4)
        assert [t["name"] for t in r["classification"]["topics"]] == [names[i] for i in np.argsort(-w, kind="stable")]


def test_concurrent_requests_share_executions_and_each_equals_its_result_alone(srv):
    alone = {t: scores_of(classify([t])["results"][0]) for t in TEXTS[:4]}
    before = requests.get(f"{srv.base_url}/stats", timeout=10).json()["classify"]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda t: classify([t]), TEXTS))
    after = requests.get(f"{srv.base_url}/stats", timeout=10).json()["classify"]
    requests_made = after["requests"] - before["requests"]
    executions = (after["capabilities"]["classification"]["executions"]
                  - before["capabilities"]["classification"]["executions"])  # fmt: skip
    texts = after["capabilities"]["classification"]["texts"] - before["capabilities"]["classification"]["texts"]
    assert requests_made == 32 and texts == 32 and executions < 32, (executions, requests_made)
    for text, reply in zip(TEXTS, replies, strict=True):
        assert [r["text"] for r in reply["results"]] == [text]  # each request gets its own text back
        if text in alone:
            got = scores_of(reply["results"][0])
            assert all(abs(got[n] - alone[text][n]) <= 1e-4 for n in got), (got, alone[text])


def test_capabilities_run_only_for_the_texts_that_ask(srv):
    before = requests.get(f"{srv.base_url}/stats", timeout=10).json()["classify"]["capabilities"]
    reply = classify(["the site is down again"], ["alerts"])
    after = requests.get(f"{srv.base_url}/stats", timeout=10).json()["classify"]["capabilities"]
    assert set(reply["results"][0]) == {"text", "alerts"}
    assert after["recommendations"]["executions"] == before["recommendations"]["executions"]
    assert after["alerts"]["executions"] == before["alerts"]["executions"] + 1
    for alert in reply["results"][0]["alerts"]:
        assert alert["type"] in ("rule", "judge") and alert["message"]


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"texts": ["x"], "capabilities": ["sentiment"]}, 400, "known: ['classification', 'recommendations', 'alerts']"),
    ({"texts": [], "capabilities": ["classification"]}, 400, "'texts'"),
    ({"texts": [3]}, 400, "'texts'"),
    ({"texts": ["x"], "capabilities": []}, 400, "'capabilities'"),
    ({"texts": ["x"], "extra": 1}, 400, "unknown fields ['extra']"),
    ({"texts": ["x" * 20_000]}, 413, "characters"),
    ({"texts": ["x"] * 3000}, 413, "split it"),
])  # fmt: skip
def test_bad_requests_are_a_4xx_naming_what_was_wrong(srv, body, status, says):
    r = requests.post(f"{srv.base_url}/classify", json=body, timeout=60)
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_a_bad_config_stops_the_server_naming_the_field(lm, tmp_path):
    bad = tmp_path / "topics.json"
    bad.write_text(json.dumps({"model": "lm", "topics": [{"name": "a", "colour": "red"}]}))
    server = ServerProcess(workers=1, models=f"lm=hf_causal_lm:{lm}", config=bad, model_repository=tmp_path / "r")
    with pytest.raises(RuntimeError, match=r"topics\[0\]: unknown fields \['colour'\]"):
        server.start(timeout_s=120)


def test_the_documents_command_line_serves_a_config_whose_model_is_a_directory(lm, tmp_path):
    """`python classifier_server.py --config topics.json --gpu-list 0,1,2,3` with nothing else."""
    import sys

    from tests.serverproc import ROOT, free_port

    config = tmp_path / "topics.json"
    config.write_text(json.dumps({"model": str(lm), "topics": TOPICS[:2]}))
    port = free_port()
    command = [sys.executable, str(ROOT / "classifier_server.py"), "--config", str(config), "--gpu-list", "0,1,2,3",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    with ServerProcess(command=command, port=port, workers=1, model_repository=tmp_path / "repo") as server:
        listing = requests.get(f"{server.base_url}/models", timeout=10).json()
        assert [m["name"] for m in listing["models"]] == ["lm"]  # the config's LLM, and nothing else
        r = requests.post(f"{server.base_url}/classify", json={"texts": ["hello"]}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]["classification"]["topics"]) == 2


def test_an_encoder_classifier_can_back_classification(lm, tmp_path):
    from models.examples.classifier import write_classifier

    enc = write_classifier(tmp_path / "enc", [t["name"] for t in TOPICS], seed=5)
    config = tmp_path / "topics.json"
    config.write_text(json.dumps({"model": "lm", "topics": TOPICS, "classification": {"model": "enc"}}))
    models = f"lm=hf_causal_lm:{lm},enc=hf_encoder:{enc}"
    with ServerProcess(workers=1, models=models, config=config, model_repository=tmp_path / "repo") as server:
        got = requests.post(f"{server.base_url}/classify", json={"texts": TEXTS[:3]}, timeout=60).json()
        direct = requests.post(f"{server.base_url}/infer/enc", json={"texts": TEXTS[:3]}, timeout=60).json()
    for r, probs in zip(got["results"], direct["probabilities"], strict=True):
        scores = scores_of(r)
        np.testing.assert_allclose([scores[t["name"]] for t in TOPICS], probs, atol=1e-3)  # engines may differ

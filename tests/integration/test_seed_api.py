"""The seed LLM server's API on real Gunicorn (2 workers, the tiny random Llama): /generate and
/chat whole and streamed, called the way the seed's Python client does (requests + SSE lines),
/stats over both workers, /health, disconnect = cancel, bad requests."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import requests
import torch

from models.examples.causal_lm import EXAMPLE_PROMPTS
from tests.conftest import GENERATION_BACKENDS, backend_settings
from tests.serverproc import ROOT, ServerProcess, poll


@pytest.fixture(scope="module", params=GENERATION_BACKENDS)
def srv(request, lm_dir):
    with ServerProcess(workers=2, models=f"tiny=hf_causal_lm:{lm_dir}", **backend_settings(request.param)) as s:
        s.engine = {"loop": "torch-fp32", "openvino": "openvino-genai-fp32"}[request.param]  # what the seed reports
        yield s


@pytest.fixture(scope="module")
def hf(hf_lm):
    return hf_lm


def seed_generate(base_url: str, prompt: str, **params) -> dict:
    """The seed's client, non-streaming: one POST, the JSON reply."""
    response = requests.post(f"{base_url}/generate", json={"prompt": prompt, **params}, timeout=60)
    response.raise_for_status()
    return response.json()


def seed_stream(base_url: str, path: str, body: dict) -> list[dict]:
    """The seed's client, streaming: read `data: {...}` lines until the final event."""
    events = []
    with requests.post(f"{base_url}{path}", json={**body, "stream": True}, stream=True, timeout=60) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                events.append(event)
                if event.get("final"):
                    break
    return events


def _reference(hf, ids: list[int], n: int, **kw) -> str:
    model, tok = hf
    t = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False, **kw)
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_generate_answers_in_the_seeds_shape(srv, hf):
    _, tok = hf
    reply = seed_generate(srv.base_url, EXAMPLE_PROMPTS[0], max_tokens=20, temperature=0,
                          metadata={"user": "u-1", "tags": ["a"]})  # fmt: skip
    assert set(reply) == {"text", "request_id", "tokens_generated", "generation_time", "tokens_per_second",
                          "finish_reason", "metadata"}  # fmt: skip
    assert reply["text"] == _reference(hf, tok(EXAMPLE_PROMPTS[0]).input_ids, 20)
    # the request's metadata, plus the document's {model_name, backend}
    assert reply["metadata"] == {"user": "u-1", "tags": ["a"], "model_name": "tiny", "backend": srv.engine}
    assert 0 < reply["tokens_generated"] <= 20 and reply["finish_reason"] in ("length", "stop")
    assert reply["generation_time"] > 0 and reply["tokens_per_second"] > 0 and reply["request_id"]


def test_streamed_generate_ends_with_the_final_event_and_matches(srv):
    whole = seed_generate(srv.base_url, EXAMPLE_PROMPTS[1], max_tokens=30, temperature=0)
    events = seed_stream(srv.base_url, "/generate", {"prompt": EXAMPLE_PROMPTS[1], "max_tokens": 30, "temperature": 0})
    *tokens, final = events
    assert "".join(e["text"] for e in tokens) == whole["text"]
    assert all(set(e) == {"text", "request_id", "tokens_generated"} for e in tokens)
    assert final["final"] is True and final["text"] == "" and final["finish_reason"] == whole["finish_reason"]
    assert final["tokens_generated"] == whole["tokens_generated"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (Debian's nodejs; .ci/run installs it)")
def test_the_seeds_javascript_client_runs_unmodified_with_nodes_fetch(srv, hf):
    _, tok = hf
    prompt = EXAMPLE_PROMPTS[1]
    run = subprocess.run(["node", str(ROOT / "tests" / "clients" / "seed_client.mjs"), srv.base_url, prompt],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["whole"]["text"] == out["streamed"]["text"] == _reference(hf, tok(prompt).input_ids, 16)
    assert out["whole"]["metadata"] == {"client": "js", "model_name": "tiny", "backend": srv.engine}
    assert 0 < out["whole"]["tokens_generated"] <= 16
    final = out["streamed"]["final"]
    # text events: one or more - tokens that arrive while the writer is busy go out in one event
    # (Sequence.stream_batches), and OpenVINO can make all 16 before the first write (CI saw 1)
    assert out["streamed"]["events"] >= 1 and final["finish_reason"] == out["whole"]["finish_reason"]
    assert out["chat"]["message"]["role"] == "assistant" and out["chat"]["tokens_generated"] <= 8


def test_chat_answers_with_a_message_and_streams(srv):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": EXAMPLE_PROMPTS[2]}]
    body = {"messages": messages, "max_tokens": 16, "temperature": 0}
    reply = requests.post(f"{srv.base_url}/chat", json=body, timeout=60).json()
    assert reply["message"]["role"] == "assistant" and isinstance(reply["message"]["content"], str)
    assert {"request_id", "tokens_generated", "generation_time", "finish_reason"} <= set(reply)
    oai = requests.post(f"{srv.base_url}/v1/chat/completions", json={"model": "tiny", **body}, timeout=60).json()
    assert reply["message"]["content"] == oai["choices"][0]["message"]["content"]  # the same batcher
    *tokens, final = seed_stream(srv.base_url, "/chat", body)
    assert "".join(e["text"] for e in tokens) == reply["message"]["content"] and final["final"]


def test_repetition_penalty_and_stop_sequences_as_the_seed_names_them(srv, hf):
    _, tok = hf
    ids = tok(EXAMPLE_PROMPTS[3]).input_ids
    reply = seed_generate(srv.base_url, EXAMPLE_PROMPTS[3], max_tokens=20, temperature=0, repetition_penalty=1.4)
    assert reply["text"] == _reference(hf, ids, 20, repetition_penalty=1.4)
    free = seed_generate(srv.base_url, EXAMPLE_PROMPTS[3], max_tokens=20, temperature=0)["text"]
    stop = free[6:9]
    cut = seed_generate(srv.base_url, EXAMPLE_PROMPTS[3], max_tokens=20, temperature=0, stop_sequences=[stop])
    assert cut["text"] == free[: free.find(stop)] and cut["finish_reason"] == "stop"


def test_stats_count_every_workers_requests(srv):
    before = requests.get(f"{srv.base_url}/stats", timeout=10).json()
    n = 6
    for i in range(n):  # a new connection each time: both workers answer some
        r = requests.post(f"{srv.base_url}/generate", json={"prompt": EXAMPLE_PROMPTS[i], "max_tokens": 8},
                          headers={"Connection": "close"}, timeout=60)  # fmt: skip
        assert r.status_code == 200
    after = requests.get(f"{srv.base_url}/stats", timeout=10).json()
    assert after["total_requests"] - before["total_requests"] == n
    assert after["total_tokens_generated"] > before["total_tokens_generated"]
    assert after["total_inference_time"] > before["total_inference_time"] and after["uptime_seconds"] > 0
    assert after["average_tokens_per_request"] > 0 and after["average_tokens_per_second"] > 0


def test_health_says_what_is_loaded(srv):
    r = requests.get(f"{srv.base_url}/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("status", "model_loaded", "tokenizer_loaded", "models")} == {
        "status": "healthy", "model_loaded": True, "tokenizer_loaded": True, "models": ["tiny"]}  # fmt: skip
    # the document's other fields, with their types
    assert body["is_loaded"] is True and body["is_ready"] is True and body["backend_type"] == srv.engine
    assert body["gpu_available"] is False and body["gpu_count"] == 0 and body["gpu_memory"] is None


def test_a_client_that_leaves_a_stream_stops_its_sequence(srv):
    def running() -> float:
        text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("binserve_running_sequences{"))  # fmt: skip

    with requests.post(f"{srv.base_url}/generate", json={"prompt": EXAMPLE_PROMPTS[4], "max_tokens": 2000,
                       "temperature": 0, "stream": True}, stream=True, timeout=60) as r:  # fmt: skip
        next(r.iter_lines())
    assert poll(lambda: running() == 0, timeout_s=30)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"prompt": 5}, "'prompt' must be a string"),
        ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be"),  # the seed's own name, not binserve's
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        # found by the fuzzing (tests/fuzz): a denormal penalty made the logits inf and the step 500
        ({"prompt": "x", "repetition_penalty": 5e-324}, "repetition_penalty"),
        ({"prompt": "x", "stop_sequences": ["a"] * 9}, "'stop_sequences'"),
        ({"prompt": "x", "best_of": 2}, "unknown fields"),
        ({"prompt": "x", "model": "nope"}, "not served"),
    ],
)
def test_bad_requests_are_4xx_naming_the_problem(srv, body, match):
    r = requests.post(f"{srv.base_url}/generate", json=body, timeout=30)
    assert 400 <= r.status_code < 500 and match in r.json()["error"]["message"], r.text

"""Generation on real Gunicorn: a tiny random Llama (models/examples/causal_lm.py) served by
hf_causal_lm, called natively, over OpenAI's routes and with the `openai` package unmodified."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from models.examples.causal_lm import EXAMPLE_PROMPTS, greedy_reference
from request_tools import send_inference_request
from tests.conftest import GENERATION_BACKENDS, backend_settings
from tests.serverproc import ServerProcess

PROMPTS = EXAMPLE_PROMPTS


@pytest.fixture(scope="module", params=GENERATION_BACKENDS)
def srv(request, lm_dir):
    """The server on each generation backend."""
    with ServerProcess(workers=1, models=f"tiny=hf_causal_lm:{lm_dir}", **backend_settings(request.param)) as s:
        s.backend = request.param
        assert requests.get(f"{s.base_url}/models", timeout=10).json()["models"][0]["runtime"]["backend_type"] == {
            "loop": "binserve-loop", "openvino": "openvino-genai"}[request.param]  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def ref(hf_lm):
    model, tok = hf_lm

    def generate(ids: list[int], n: int) -> list[int]:
        return greedy_reference(model, ids, n)

    generate.tok = tok
    return generate


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0)


def _stats(srv) -> dict:
    return requests.get(f"{srv.base_url}/models", timeout=10).json()["models"][0]["stats"]


def test_eight_concurrent_greedy_requests_equal_generate_alone(srv, ref):
    lengths = [5, 17, 9, 30, 3, 12, 21, 8]
    prompts = [ref.tok(p).input_ids for p in PROMPTS]

    def call(i):
        body = {"input_ids": prompts[i], "max_new_tokens": lengths[i], "temperature": 0}
        return send_inference_request(body, f"{srv.base_url}/infer")

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(call, range(8)))
    for i, reply in enumerate(replies):
        expected = ref(prompts[i], lengths[i])
        assert reply["output_ids"].tolist() == expected[: len(reply["output_ids"])]
        assert reply["finish_reason"] == "length" or expected[len(reply["output_ids"])] in (ref.tok.eos_token_id,)


def test_streams_concatenate_to_the_non_streamed_answer(oai):
    whole = oai.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    parts = oai.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    assert whole.usage.completion_tokens == 24 and whole.choices[0].finish_reason == "length"


def test_openai_chat_stream_works_unmodified(oai, ref):
    messages = [{"role": "user", "content": "Hello! How are you?"}]
    whole = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    usage = {"include_usage": True}
    stream = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True, stream_options=usage
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    prompt = ref.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(ref.tok(prompt, add_special_tokens=False).input_ids)


def test_concurrent_streams_share_steps(srv, oai):
    before = _stats(srv)["steps"]

    def stream(i):
        chunks = oai.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=64, temperature=0, stream=True)
        return sum(1 for _ in chunks)

    with ThreadPoolExecutor(8) as pool:
        assert all(n > 0 for n in pool.map(stream, range(8)))
    steps = _stats(srv)["steps"] - before
    # 8 x 64 tokens one after the other would take 8 x 63 steps; shared, two streams per step at least
    # (OpenVINO's steps are short enough that the 8 requests' arrival spreads over more of them: ~150 here)
    assert steps <= 8 * 64 // 2, steps


def test_stop_max_tokens_and_seed(oai):
    free = oai.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=30, temperature=0).choices[0].text
    stop = free[10:13]
    cut = oai.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        oai.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=1.0, top_p=0.95, seed=s)
        .choices[0]
        .text
        for s in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_a_disconnected_stream_stops_its_sequence(srv):
    before = _stats(srv)["generated_tokens"]
    body = json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True})
    body = body.encode()  # greedy from "Hello" never reaches EOS on this model: only the disconnect can stop it
    host, port = srv.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data: " not in got and len(got) < 65536:
            got += sock.recv(4096)  # the headers, then the first chunks: it is streaming
        assert b"data: " in got
    deadline = time.monotonic() + 30
    while _stats(srv)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the server's own count of running sequences
    assert _stats(srv)["running"] == 0
    assert _stats(srv)["generated_tokens"] - before < 1500


def test_bad_generation_requests_are_4xx(srv, oai):
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be"):  # OpenAI's name, as it was sent
        oai.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="'max_completion_tokens' must be"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_completion_tokens=0)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        oai.completions.create(model="tiny", prompt="x", n=17)
    with pytest.raises(openai.APIStatusError) as caught:
        oai.completions.create(model="tiny", prompt="x " * 10, max_tokens=2047)
    assert caught.value.status_code == 413 and "+ max_tokens (2047)" in caught.value.message
    with pytest.raises(openai.APIStatusError) as caught:
        oai.completions.create(model="tiny", prompt="x" * 70_000, max_tokens=2)  # refused before tokenizing
    assert caught.value.status_code == 413 and "characters" in caught.value.message
    v2 = {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}
    resp = requests.post(f"{srv.base_url}/v2/models/tiny/infer", json=v2, timeout=10)
    assert resp.status_code == 400 and "generates text" in resp.json()["error"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=5)


def test_generation_metrics(srv):
    text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = [s for s in families["binserve_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) > 0
    assert sum(s.value for s in families["binserve_generated_tokens"].samples) > 0
    assert "binserve_inter_token_latency_seconds" in families and "binserve_running_sequences" in families
    np.testing.assert_equal(sum(s.value for s in families["binserve_waiting_sequences"].samples), 0)


def test_penalties_through_the_openai_package(oai, hf_lm):
    model, tok = hf_lm
    ids = tok(PROMPTS[4]).input_ids
    t = torch.tensor([ids])
    with torch.no_grad():
        ref = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.5)[0, len(ids):].tolist()  # fmt: skip
    got = oai.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0,
                                 extra_body={"repetition_penalty": 1.5})  # fmt: skip
    assert got.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    plain = oai.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)
    penal = oai.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0, presence_penalty=1.5,
                                   frequency_penalty=1.0)  # fmt: skip
    assert penal.choices[0].text != plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        oai.completions.create(model="tiny", prompt=ids, max_tokens=5, presence_penalty=3)


def _step_logprobs(model, ids: list[int], out: list[int]) -> list[torch.Tensor]:
    """Log-softmax of the model's logits at each generated position (one forward of the whole text)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0].float()
    return [torch.log_softmax(logits[len(ids) - 1 + i], -1) for i in range(len(out))]


def test_chosen_token_logprobs_on_every_backend_and_alternatives_where_it_gives_them(srv, oai, hf_lm):
    """OpenVINO GenAI reports the chosen token's log-probability only: asking it for alternatives
    is a 400 naming that; the chosen ones agree with transformers' on every backend."""
    model, tok = hf_lm
    ids = tok(PROMPTS[5]).input_ids
    got = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=0)
    steps = _step_logprobs(model, ids, greedy_reference(model, ids, 12))
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.token_logprobs == pytest.approx([float(s.max()) for s in steps[: len(lp.tokens)]], abs=1e-3)
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[5]}],
                                       max_tokens=6, temperature=0, logprobs=True)  # fmt: skip
    assert "".join(c.token for c in chat.choices[0].logprobs.content) == chat.choices[0].message.content
    if srv.backend == "openvino":
        with pytest.raises(openai.BadRequestError, match="chosen token's logprob only"):
            oai.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=3)


def test_logprobs_in_openais_shapes_whole_and_streamed(srv, oai, hf_lm):
    if srv.backend == "openvino":
        pytest.skip("alternatives' logprobs: OpenVINO GenAI refuses them (the test above checks the 400)")
    model, tok = hf_lm
    ids = tok(PROMPTS[5]).input_ids
    got = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    steps = _step_logprobs(model, ids, greedy_reference(model, ids, 12))  # the ids the server made (greedy)
    assert "".join(lp.tokens) == got.choices[0].text and len(lp.tokens) == len(lp.token_logprobs)
    ref = [float(s.max()) for s in steps[: len(lp.tokens)]]
    assert lp.token_logprobs == pytest.approx(ref, abs=1e-3)  # greedy: the chosen one is the most likely
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-3)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # fmt: skip
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[5]}],
                                       max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4)
               and c.bytes == list(c.token.encode()) for c in content)  # fmt: skip
    messages = [{"role": "user", "content": PROMPTS[5]}]
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2, stream=True)  # fmt: skip
    streamed = [c for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]  # fmt: skip
    assert [(c.token, round(c.logprob, 4)) for c in streamed] == [(c.token, round(c.logprob, 4)) for c in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2)


def test_n_choices_share_the_prompt_and_seed_each_choice(oai, ref):
    ids = ref.tok(PROMPTS[6]).input_ids
    greedy = oai.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1  # greedy: every choice the same text
    assert greedy.choices[0].text == ref.tok.decode(ref(ids, 10), skip_special_tokens=True)
    assert greedy.usage.prompt_tokens == len(ids)
    assert greedy.usage.completion_tokens == 3 * 10 or greedy.choices[0].finish_reason == "stop"
    seeded = [oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=1.0, seed=11, n=3)
              for _ in range(2)]  # fmt: skip
    texts = [[c.text for c in r.choices] for r in seeded]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # reproducible, and each choice its own seed
    one = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=1.0, seed=12)
    assert one.choices[0].text == texts[0][1]  # choice 1 of seed 11 samples with seed 12
    stream = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[6]}],
                                         max_tokens=8, temperature=1.0, seed=3, n=2, stream=True)  # fmt: skip
    by_index = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            by_index[c.index] += c.delta.content or ""
    whole = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[6]}],
                                        max_tokens=8, temperature=1.0, seed=3, n=2)  # fmt: skip
    assert [by_index[0], by_index[1]] == [c.message.content for c in whole.choices]

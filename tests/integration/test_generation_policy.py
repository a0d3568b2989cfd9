"""The policy layer on generation (real Gunicorn, the tiny random Llama): prompt and generated
tokens charged to the key, exactly, streamed or not; greedy and seeded completions answered from
the response cache, sampled ones and streams never."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from models.examples.causal_lm import EXAMPLE_PROMPTS
from tests.conftest import GENERATION_BACKENDS, backend_settings
from tests.serverproc import ServerProcess

KEY = "sk-generation-0123456789"


@pytest.fixture(scope="module", params=GENERATION_BACKENDS)
def srv(request, tmp_path_factory, lm_dir):
    root = tmp_path_factory.mktemp("gen-policy")
    lm = lm_dir
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "gen", "key": KEY, "routes": ["generate"],
                                          "tokens_per_minute": 6_000_000}]}))  # fmt: skip
    with ServerProcess(workers=1, models=f"tiny=hf_causal_lm:{lm}", api_keys_file=keys,
                       response_cache_bytes=1 << 20, **backend_settings(request.param)) as s:  # fmt: skip
        yield s


def _tokens_charged(srv) -> float:
    text = requests.get(f"{srv.base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "binserve_key_tokens":
            return sum(s.value for s in family.samples if s.labels.get("key") == "gen" and s.name.endswith("_total"))
    return 0.0


def test_prompt_and_generated_tokens_are_charged_streamed_or_not(srv):
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=KEY, max_retries=0)
    before = _tokens_charged(srv)
    done = client.completions.create(model="tiny", prompt=EXAMPLE_PROMPTS[0], max_tokens=23, temperature=1.0)
    assert _tokens_charged(srv) - before == done.usage.prompt_tokens + done.usage.completion_tokens
    before = _tokens_charged(srv)
    stream = client.completions.create(model="tiny", prompt=EXAMPLE_PROMPTS[1], max_tokens=37, temperature=1.0,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert _tokens_charged(srv) - before == usage.prompt_tokens + usage.completion_tokens
    with pytest.raises(openai.PermissionDeniedError, match="OpenAI routes"):
        client.embeddings.create(model="tiny", input="not a generation route")


def test_greedy_and_seeded_completions_come_from_the_cache_and_sampled_ones_never(srv):
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=KEY, max_retries=0)

    def raw(**kw):
        r = client.completions.with_raw_response.create(model="tiny", prompt=EXAMPLE_PROMPTS[2], max_tokens=12, **kw)
        return r.headers.get("X-Cache"), r.parse()

    (c1, first), (c2, again) = raw(temperature=0), raw(temperature=0)
    assert (c1, c2) == ("miss", "hit")
    assert again.choices[0].text == first.choices[0].text and again.usage == first.usage and again.id != first.id
    assert [raw(temperature=0.8, seed=7)[0] for _ in range(2)] == ["miss", "hit"]
    assert raw(temperature=0.8)[0] is None  # sampled without a seed: never cached
    before = _tokens_charged(srv)
    _, hit = raw(temperature=0)
    assert _tokens_charged(srv) - before == hit.usage.total_tokens  # a hit is charged like the generation
    stream = client.completions.with_raw_response.create(model="tiny", prompt=EXAMPLE_PROMPTS[2], max_tokens=12,
                                                        temperature=0, stream=True)  # fmt: skip
    assert stream.headers.get("X-Cache") is None

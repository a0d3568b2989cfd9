"""Scoring continuations with a shared prefix (models/lm_scoring.py) equals one unpadded forward per
prefix and continuation, whatever the mix of lengths; and the capability config's checks."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from binserve.capabilities.config import CapabilityConfig
from models.examples.causal_lm import write_causal_lm
from models.lm_scoring import continuation_logprobs, reference_logprobs


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = write_causal_lm(tmp_path_factory.mktemp("score") / "lm", layers=2, hidden=64)
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


def test_batched_scores_equal_one_unpadded_forward_each(lm):
    model, tok = lm
    prefixes = [tok(t).input_ids for t in ("hi", "the quick brown fox jumps over", "a b c d e f g h i j k l m n")]
    conts = [tok(" " + t, add_special_tokens=False).input_ids for t in ("x", "science fiction novels", "art")]
    assert len({len(p) for p in prefixes}) == 3 and len({len(c) for c in conts}) == 3  # every padding case
    got = continuation_logprobs(model, prefixes, conts, tok.pad_token_id or 0)
    want = np.array([[reference_logprobs(model, p, c) for c in conts] for p in prefixes])
    np.testing.assert_allclose(got, want, atol=1e-4)
    alone = continuation_logprobs(model, prefixes[1:2], conts, tok.pad_token_id or 0)
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5)  # the same alone or in a batch


def test_an_empty_prefix_or_continuation_is_refused(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="at least one token"):
        continuation_logprobs(model, [[1, 2]], [[]])


@pytest.mark.parametrize(("raw", "says"), [
    ({"topics": [{"name": "a"}]}, "'model' must be a non-empty string"),
    ({"model": "lm", "topics": []}, "'topics' must be a list of 1-64 topics"),
    ({"model": "lm", "topics": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"model": "lm", "topics": [{"name": "a", "colour": "red"}]}, r"topics\[0\]: unknown fields \['colour'\]"),
    ({"model": "lm", "topics": [{"name": "a"}], "classification": {"prompt": "no text here"}}, "must contain"),
    ({"model": "lm", "topics": [{"name": "a"}], "classification": {"prompt": "{text} {oops}"}}, "not 'oops'"),
    ({"model": "lm", "topics": [{"name": "a"}], "alerts": {"rules": [{"topic": "b", "threshold": 0.5}]}},
     r"rules\[0\].topic: 'b' is not one of the topics"),
    ({"model": "lm", "topics": [{"name": "a"}], "alerts": {"rules": [{"topic": "a", "threshold": 2}]}}, "[0, 1]"),
    ({"model": "lm", "topics": [{"name": "a"}], "recommendations": {"max_tokens": 0}}, "max_tokens"),
    ({"model": "lm", "topics": [{"name": "a"}], "sentiment": {}}, "unknown fields ['sentiment']"),
])  # fmt: skip
def test_a_bad_config_is_refused_naming_the_field(raw, says):
    with pytest.raises(ValueError) as caught:
        CapabilityConfig.parse(raw, "topics.json")
    assert says in str(caught.value) or __import__("re").search(says, str(caught.value)), str(caught.value)


def test_the_minimal_config_gives_every_capability_its_defaults():
    cfg = CapabilityConfig.parse({"model": "lm", "topics": [{"name": "a", "description": "about a"}, {"name": "b"}]})
    assert cfg.topic_names == ["a", "b"] and cfg.topics_text() == "- a: about a\n- b"
    assert "{text}" in cfg.classify_prompt and cfg.recommend_max_tokens == 32 and cfg.rules == ()


def test_the_readmes_topics_json_is_a_valid_config():
    import json
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("```json\n", readme.index("`topics.json` (checked at start")) + len("```json\n")
    cfg = CapabilityConfig.parse(json.loads(readme[start : readme.index("```", start)]), "README")
    assert cfg.topic_names == ["training", "billing"] and cfg.rules[0].topic == "billing" and cfg.judge_question


def test_the_shipped_example_configuration_is_valid():
    from models.examples import TOPICS_CONFIG

    cfg = CapabilityConfig.parse(TOPICS_CONFIG, "examples/topics.json")
    assert cfg.model == "lm" and len(cfg.topics) == 4 and cfg.rules[0].topic == "outage"

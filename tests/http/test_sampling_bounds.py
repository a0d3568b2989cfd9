"""The sampling values a generation request may set, refused outside their bounds (one table:
binserve/scheduling/sampling_bounds.py), through the native route (which passes nulls on as sent)
on the tiny causal LM."""

from __future__ import annotations

import pytest

from binserve.scheduling.sampling_bounds import BOUNDS


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("temperature", 2.5, "a number in [0, 2]"),
        ("temperature", None, "a number in [0, 2]"),  # null is not the default: only seed/logprobs may be null
        ("temperature", True, "a number in [0, 2]"),
        ("top_p", 0, "a number in (0, 1]"),
        ("top_k", -1, "an int >= 0"),
        ("top_k", 1.5, "an int >= 0"),
        ("seed", 2**63, "an int in [0, 9.22337e+18]"),
        ("repetition_penalty", 0.05, "a number in [0.1, 10] (1: off)"),
        ("presence_penalty", 3, "a number in [-2, 2] (OpenAI's range; 0: off)"),
    ],
)
def test_out_of_bounds_sampling_values_are_400_naming_the_field(lm_manager, make_client, field, value, says):
    r = make_client().post("/infer/lm", json={"input_ids": [1, 2, 3], "max_new_tokens": 2, field: value})
    assert r.status_code == 400, r.get_json()
    assert f"'{field}' must be {says}" in r.get_json()["error"]["message"]


def test_in_bounds_values_and_nulls_where_the_default_is_null_are_served(lm_manager, make_client):
    edges = {"temperature": 2, "top_p": 1, "top_k": 0, "seed": None, "repetition_penalty": 10, "presence_penalty": -2}
    r = make_client().post("/infer/lm", json={"input_ids": [1, 2, 3], "max_new_tokens": 2, **edges})
    assert r.status_code == 200, r.get_json()
    assert BOUNDS["top_p"].schema() == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}

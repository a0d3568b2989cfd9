"""Adapters alone: validate (before queueing), collate/forward/split through run_batch, join."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binserve.engines.settings import RuntimeSettings
from binserve.errors import InvalidInput, LimitExceeded
from models.base import AdapterOptions, RequestLimits
from models.hf_encoder import HFEncoder
from models.registry import ModelSpec, default_minilm_path, load_model, parse_specs
from models.torch_module import TorchModule

CPU = torch.device("cpu")
# These tests check collation, padding and splitting exactly, so they pin the fp32 reference engine;
# tests/unit/test_engines.py checks the other engines against it.
FP32 = AdapterOptions(runtime=RuntimeSettings(runtime="torch", precision="fp32"))


@pytest.fixture(scope="module")
def minilm() -> HFEncoder:
    return load_model(ModelSpec("minilm", "hf_encoder", default_minilm_path()), CPU, FP32)


@pytest.fixture(scope="module")
def policy() -> TorchModule:
    return load_model(ModelSpec("policy", "torch_module", "models/policy_v1"), CPU, FP32)


def test_texts_are_tokenized_without_padding(minilm):
    v = minilm.validate({"texts": ["a b", "a much longer sentence than the first"]})
    assert v.batched and len(v.samples) == 2
    assert len(v.samples[0]) < len(v.samples[1])  # each sample keeps its own length
    assert v.samples[0][0] == minilm.tokenizer.cls_token_id


_TEXTS = ["one", "Ünïcödé — 東京 emoji 🚀 and  double  spaces", "word " * 600, "", "tail"]


@pytest.mark.parametrize("truncate", [True, False])
def test_direct_tokenizer_gives_transformers_ids(truncate):
    """validate() tokenizes with the Rust tokenizer directly; its rows are the ids transformers'
    own call gives, cut at max_length with the special tokens kept (or refused when truncate is off)."""
    enc = load_model(
        ModelSpec("minilm", "hf_encoder", default_minilm_path()),
        CPU,
        AdapterOptions(runtime=FP32.runtime, limits=RequestLimits(truncate=truncate)),
    )
    texts = _TEXTS if truncate else [t for t in _TEXTS if len(t) < 1000]
    expected = enc.tokenizer(texts, truncation=truncate, max_length=enc.max_length if truncate else None)
    for batch in (texts, texts[:1], texts[1:2]):
        rows = enc.validate({"texts": batch}).samples
        want = expected["input_ids"][texts.index(batch[0]) : texts.index(batch[0]) + len(batch)]
        assert [r.tolist() for r in rows] == want
        assert all(r.dtype == np.int64 for r in rows)
    assert len(enc.validate({"texts": ["word " * 600]} if truncate else {"texts": ["x"]}).samples[0]) <= enc.max_length
    if not truncate:
        with pytest.raises(LimitExceeded, match="tokens"):
            enc.validate({"texts": ["word " * 600]})


def test_single_text_is_not_batched(minilm):
    v = minilm.validate({"texts": "one"})
    out = minilm.join(minilm.run_batch(v.samples), v.batched)
    assert out["embeddings"].shape == (384,)


def test_padding_does_not_change_embeddings(minilm):
    short, long = minilm.validate({"texts": ["short", "a considerably longer sentence here"]}).samples
    alone = minilm.run_batch([short])[0]["embeddings"]
    together = minilm.run_batch([short, long])[0]["embeddings"]
    np.testing.assert_allclose(alone, together, atol=1e-5)
    assert abs(np.linalg.norm(alone) - 1) < 1e-5


def test_input_ids_forms_agree_with_texts(minilm):
    ids = minilm.validate({"texts": ["hello world"]}).samples[0]
    from_texts = minilm.run_batch([ids])[0]["embeddings"]
    for payload in (
        {"input_ids": ids.tolist()},
        {"input_ids": ids},
        {"input_ids": [ids.tolist()]},
        {"input_ids": np.stack([np.r_[ids, [0, 0]]]), "attention_mask": np.stack([np.r_[np.ones_like(ids), [0, 0]]])},
    ):
        v = minilm.validate(payload)
        np.testing.assert_allclose(minilm.run_batch(v.samples)[0]["embeddings"], from_texts, atol=1e-5)


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"texts": []}, "'texts' is an empty list"),
        ({"texts": [1, 2]}, "'texts' must be a str or a list of str"),
        ({"text": ["x"]}, "expected 'texts'"),
        ({"texts": ["x"], "extra": 1}, "unexpected keys \\['extra'\\]"),
        ({"input_ids": [[1, 2], []]}, "row 1 is empty"),
        ({"input_ids": [1, 99999]}, "outside \\[0, 30522\\)"),
        ({"input_ids": np.zeros((2, 2, 2), np.int64)}, "must be 1-D"),
        ({"input_ids": np.zeros(3, np.float32) + 0.5}, "dtype float32, expected int64"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, "same shape"),
    ],
)
def test_bad_token_inputs_name_the_problem(minilm, payload, match):
    with pytest.raises(InvalidInput, match=match):
        minilm.validate(payload)


# --- sizes are checked before anything expensive --------------------------------------------------


@pytest.fixture(scope="module")
def strict_minilm() -> HFEncoder:
    """MiniLM that refuses what it would otherwise truncate, and takes at most 4 samples."""
    limits = RequestLimits(max_samples=4, max_text_chars=100, truncate=False)
    return load_model(ModelSpec("minilm", "hf_encoder", default_minilm_path()), CPU, AdapterOptions(limits=limits))


def test_long_token_rows_are_truncated_by_default(minilm):
    ids = [101, *range(1000, 1400), 102]
    (row,) = minilm.validate({"input_ids": [ids]}).samples
    assert row.tolist() == ids[:256]


def test_long_texts_are_cut_to_the_model_maximum(minilm):
    text = "word " * 20_000  # 100k characters, far more than 256 tokens
    (row,) = minilm.validate({"texts": [text]}).samples
    assert len(row) == 256 and minilm.max_text_chars == 32 * 256
    # cutting the characters first changes nothing once the text holds more than max_length tokens
    (reference,) = minilm.validate({"texts": [text[: minilm.max_text_chars]]}).samples
    np.testing.assert_array_equal(row, reference)


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"texts": ["x"] * 5}, "'texts' holds 5 samples; one request may hold at most 4"),
        ({"input_ids": np.zeros((5, 3), np.int64)}, "'input_ids' holds 5 samples"),
        ({"input_ids": [[101, 102]] * 5}, "'input_ids' holds 5 samples"),
        ({"texts": ["y" * 101]}, "text 0 of 'texts' has 101 characters; this model takes at most 100"),
        ({"input_ids": [list(range(1000, 1300))]}, "'input_ids' row 0 has 300 tokens; this model takes at most 256"),
    ],
)
def test_limits_refuse_with_413_before_the_work(strict_minilm, payload, match):
    with pytest.raises(LimitExceeded, match=match) as info:
        strict_minilm.validate(payload)
    assert info.value.status_code == 413


def test_strict_token_limit_counts_tokens_not_characters():
    limits = RequestLimits(max_text_chars=10_000, truncate=False)
    model = load_model(ModelSpec("m", "hf_encoder", default_minilm_path()), CPU, AdapterOptions(limits=limits))
    with pytest.raises(LimitExceeded, match="text 0 has 302 tokens; this model takes at most 256"):
        model.validate({"texts": ["word " * 300]})


def test_policy_refuses_more_samples_than_a_request_may_hold():
    limits = RequestLimits(max_samples=2)
    model = load_model(ModelSpec("policy", "torch_module", "models/policy_v1"), CPU, AdapterOptions(limits=limits))
    assert model.plan is None  # validation needs no engines
    payload = {"image": np.zeros((3, 480, 640, 3), np.uint8), "state": np.zeros((3, 6), np.float32)}
    with pytest.raises(LimitExceeded, match="'image' holds 3 samples"):
        model.validate(payload)


def test_policy_single_and_batch(policy):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (3, 480, 640, 3), dtype=np.uint8)
    state = rng.standard_normal((3, 6)).astype(np.float32)
    batch = policy.validate({"image": image, "state": state})
    assert batch.batched and len(batch.samples) == 3
    joined = policy.join(policy.run_batch(batch.samples), True)
    with torch.inference_mode():
        direct = policy.module(torch.from_numpy(image), torch.from_numpy(state)).numpy()
    np.testing.assert_allclose(joined["action"], direct, atol=1e-6)
    single = policy.validate({"image": image[0], "state": state[0]})
    assert not single.batched
    np.testing.assert_allclose(policy.join(policy.run_batch(single.samples), False)["action"], direct[0], atol=1e-6)


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"image": np.zeros((480, 640, 3), np.uint8)}, "missing inputs \\['state'\\]"),
        ({"image": np.zeros((480, 640, 3), np.uint8), "state": np.zeros(6, np.float32), "x": 1}, "unknown inputs"),
        (
            {"image": np.zeros((480, 640), np.uint8), "state": np.zeros(6, np.float32)},
            "'image' has shape \\(480, 640\\)",
        ),
        ({"image": np.zeros((480, 640, 3), np.float32) + 0.5, "state": np.zeros(6)}, "'image' has dtype float32"),
        ({"image": np.zeros((2, 480, 640, 3), np.uint8), "state": np.zeros((3, 6), np.float32)}, "disagree"),
    ],
)
def test_policy_bad_inputs(policy, payload, match):
    with pytest.raises(InvalidInput, match=match):
        policy.validate(payload)


def test_parse_specs():
    assert parse_specs("")[0].name == "minilm"
    specs = parse_specs("a=hf_encoder:/m, b=torch_module:models/policy_v1")
    got = [(s.name, s.adapter, s.path) for s in specs]
    assert got == [("a", "hf_encoder", "/m"), ("b", "torch_module", "models/policy_v1")]
    with pytest.raises(ValueError, match="unknown adapter 'onnx'"):
        parse_specs("a=onnx:/x")
    with pytest.raises(ValueError, match="unique"):
        parse_specs("a=hf_encoder:/x,a=hf_encoder:/y")

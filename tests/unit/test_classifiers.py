"""Classifiers that speak labels, with real MiniLM encoder weights under seeded heads; shared tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from binserve.engines.settings import RuntimeSettings
from binserve.errors import InvalidInput
from models.base import AdapterOptions
from models.examples.classifier import TOPICS, TOXICITY, write_classifier
from models.hf_encoder import HFEncoder
from models.labels import label_rows
from models.registry import default_minilm_path

TEXTS = ["Stocks fell sharply on Tuesday.", "The team won the final match.", "you are an idiot", "hi"]
FP32 = AdapterOptions(runtime=RuntimeSettings("torch", "fp32"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "topics": write_classifier(root / "topics", TOPICS, seed=0),
        "toxicity": write_classifier(root / "toxicity", TOXICITY, multi_label=True, seed=1),
    }


@pytest.fixture(scope="module")
def adapters(dirs):
    out = {name: HFEncoder(name, "1", str(d), torch.device("cpu"), FP32) for name, d in dirs.items()}
    for a in out.values():
        a.prepare()
    return out


def _reply(adapter, payload):
    v = adapter.validate(payload)
    return adapter.join(adapter.run_batch(v.samples), v.batched, v.options)


def _direct(path) -> np.ndarray:
    """Logits from transformers itself, run on the texts one at a time (no padding)."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return np.concatenate([model(**tok(t, return_tensors="pt")).logits.numpy() for t in TEXTS])


def test_probabilities_are_softmax_or_sigmoid_of_the_models_logits(adapters, dirs):
    topics, toxicity = _direct(dirs["topics"]), _direct(dirs["toxicity"])
    got = _reply(adapters["topics"], {"texts": TEXTS})
    np.testing.assert_allclose(got["probabilities"], torch.softmax(torch.from_numpy(topics), -1).numpy(), atol=1e-5)
    got = _reply(adapters["toxicity"], {"texts": TEXTS})
    np.testing.assert_allclose(got["probabilities"], torch.sigmoid(torch.from_numpy(toxicity)).numpy(), atol=1e-5)


def test_default_labels_top_one_or_over_half(adapters):
    topics = _reply(adapters["topics"], {"texts": TEXTS})
    assert topics["labels"] == [[TOPICS[i]] for i in topics["probabilities"].argmax(1)]
    tox = _reply(adapters["toxicity"], {"texts": TEXTS})
    for probs, labels, scores in zip(tox["probabilities"], tox["labels"], tox["scores"], strict=True):
        over = sorted((i for i in range(len(TOXICITY)) if probs[i] >= 0.5), key=lambda i: -probs[i])
        assert labels == [TOXICITY[i] for i in over]
        np.testing.assert_allclose(scores, probs[over], rtol=1e-6)
    assert any(len(labels) > 1 for labels in tox["labels"])  # multi-label: several labels for one text


def test_top_k_and_threshold(adapters):
    got = _reply(adapters["topics"], {"texts": TEXTS, "top_k": 3})
    for probs, labels, scores in zip(got["probabilities"], got["labels"], got["scores"], strict=True):
        order = np.argsort(-probs)[:3]
        assert labels == [TOPICS[i] for i in order]
        assert scores == sorted(scores, reverse=True)
    got = _reply(adapters["topics"], {"texts": TEXTS, "threshold": 0.2, "top_k": 2})
    for probs, scores in zip(got["probabilities"], got["scores"], strict=True):
        assert len(scores) == min(2, int((probs >= 0.2).sum())) and all(s >= 0.2 for s in scores)
    one = _reply(adapters["topics"], {"texts": TEXTS[0], "top_k": 2})  # one sample: no batch axis
    assert isinstance(one["labels"][0], str) and len(one["scores"]) == 2


@pytest.mark.parametrize(
    "options", [{"top_k": 0}, {"top_k": 6}, {"top_k": "2"}, {"top_k": True}, {"threshold": 1.5}, {"threshold": "x"}]
)
def test_bad_options_are_400(adapters, options):
    with pytest.raises(InvalidInput):
        adapters["topics"].validate({"texts": TEXTS, **options})


def test_an_embedding_model_takes_no_label_options():
    minilm = HFEncoder("minilm", "1", default_minilm_path(), torch.device("cpu"), FP32)
    with pytest.raises(InvalidInput, match="unexpected keys"):
        minilm.validate({"texts": TEXTS, "top_k": 1})


def test_models_with_one_tokenizer_tokenize_a_request_once(adapters, monkeypatch):
    calls = []
    for a in adapters.values():
        real = a._tokenize
        monkeypatch.setattr(a, "_tokenize", lambda texts, *rest, real=real: calls.append(1) or real(texts, *rest))
    texts, shared = list(TEXTS), {}
    first = adapters["topics"].validate({"texts": texts}, shared)
    second = adapters["toxicity"].validate({"texts": texts, "top_k": 1}, shared)
    assert len(calls) == 1 and first.samples is second.samples and second.options == {"top_k": 1}
    adapters["toxicity"].validate({"texts": list(TEXTS)}, shared)  # other texts: tokenized on their own
    assert len(calls) == 2


def test_label_rows_unit():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]])
    assert label_rows(probs, ["a", "b", "c"], False, {}) == ([["b"], ["a"]], [[0.7], [0.5]])
    assert label_rows(probs, ["a", "b", "c"], True, {})[0] == [["b"], ["a", "b"]]
    assert label_rows(probs, ["a", "b", "c"], False, {"threshold": 0.15})[0] == [["b", "c"], ["a", "b"]]

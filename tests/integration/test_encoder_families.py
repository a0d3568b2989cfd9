"""Every encoder family the seeds name serves what transformers computes, on real Gunicorn: T5 (encoder
alone, encoder-decoder directory, classifier, sentence-T5 with a Dense projection), DeBERTa-v2 and
ModernBERT (encoder and classifier), tiny random models built here (models/examples/encoders.py),
with whatever engines the plan picks (one text and a batch of eight can run on different ones)."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch
import transformers
from sentence_transformers import SentenceTransformer

from models.examples.encoders import FAMILIES, LABELS, write_encoder
from tests.serverproc import ServerProcess

TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the central bank raised interest rates again on Tuesday.",
    "Ünïcödé, emoji 🙂 and numbers 3.14159 mixed in one line.",
    " ".join(f"a long text of many words, number {i}, to fill the rows" for i in range(12)),
    "What is the capital of France?",
    "binserve batches concurrent requests",
    "short",
]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_encoder(root / name, name, seed=i) for i, name in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def srv(families):
    models = ",".join(f"{name}=hf_encoder:{path}" for name, path in families.items())
    with ServerProcess(workers=1, models=models) as s:
        yield s


def reference(name: str, path) -> np.ndarray:
    """What transformers (sentence-transformers for the sentence-T5 directory) computes for TEXTS."""
    if name == "sentence-t5":
        return SentenceTransformer(str(path), device="cpu").encode(TEXTS, normalize_embeddings=True)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
    classifier = name.endswith("classifier")
    if classifier:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    elif name.startswith("t5"):
        model = transformers.T5EncoderModel.from_pretrained(path)  # the encoder of either T5 directory
    else:
        model = transformers.AutoModel.from_pretrained(path)
    with torch.no_grad():
        out = model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if classifier:
        return out.logits.softmax(-1).numpy()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_serves_what_transformers_computes(srv, families, name):
    want = reference(name, families[name])
    alone = [requests.post(f"{srv.base_url}/infer/{name}", json={"texts": t}, timeout=60) for t in TEXTS[:2]]
    batch = requests.post(f"{srv.base_url}/infer/{name}", json={"texts": TEXTS}, timeout=60)
    for r in [*alone, batch]:
        assert r.status_code == 200, r.text
    key = "probabilities" if name.endswith("classifier") else "embeddings"
    got = np.asarray(batch.json()[key])
    got_alone = np.asarray([r.json()[key] for r in alone])
    if key == "embeddings":
        for rows, ref in ((got, want), (got_alone, want[:2])):
            cosine = (rows * ref).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(ref, axis=1)
            assert cosine.min() >= 0.999, (name, cosine)
    else:
        for rows, ref in ((got, want), (got_alone, want[:2])):
            assert (rows.argmax(1) == ref.argmax(1)).all() and np.abs(rows - ref).max() <= 0.02, (name, rows, ref)
        assert [row[0] for row in batch.json()["labels"]] == [LABELS[i] for i in want.argmax(1)]
    info = {m["name"]: m for m in requests.get(f"{srv.base_url}/models", timeout=10).json()["models"]}[name]
    assert info["engines"], info  # the plan the replies came from, whichever it is

"""A restart serves what its configuration says, on real Gunicorn with one repository kept across runs:
a changed path is served, an unchanged one leaves a hot reload standing, and a missing directory is
named plainly (never a hub error)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models.examples.classifier import TOPICS, TOXICITY, write_classifier
from tests.serverproc import ServerProcess

ADMIN = "restart-admin"
FP32 = ";runtime=torch;precision=fp32"  # the reference engine only: quick to load, exact to compare
TEXTS = ["Stocks fell sharply on Tuesday.", "The team won the final match."]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    return {
        "A": write_classifier(root / "incoming" / "A", TOPICS, seed=0),
        "B": write_classifier(root / "incoming" / "B", TOXICITY, multi_label=True, seed=1),
        "C": write_classifier(root / "incoming" / "C", TOXICITY, multi_label=True, seed=2),  # B's shape
        "root": root,
    }


def served(srv) -> tuple[str, list[str], np.ndarray]:
    """(version, labels, probabilities of TEXTS) that the server answers for `topics`."""
    r = requests.post(f"{srv.base_url}/infer/topics", json={"texts": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    info = requests.get(f"{srv.base_url}/models", timeout=10).json()["models"][0]
    return r.headers["X-Model-Version"], info["inputs"]["labels"], np.asarray(r.json()["probabilities"])


def reference(path) -> np.ndarray:
    """The directory's probabilities of TEXTS, from transformers directly."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = model(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    multi = model.config.problem_type == "multi_label_classification"
    return (torch.sigmoid(logits) if multi else logits.softmax(-1)).numpy()


def start(repo, path, **settings) -> ServerProcess:
    # the server's flags too: a version imported by /update_model runs on them, not on the spec's settings
    return ServerProcess(workers=1, models=f"topics=hf_encoder:{path}{FP32}", model_repository=repo,
                         runtime="torch", precision="fp32", **settings)  # fmt: skip


def test_a_restart_serves_the_configured_directory_and_keeps_a_hot_reload(dirs):
    repo = dirs["root"] / "repo"
    with start(repo, dirs["A"]) as srv:
        version, labels, probs = served(srv)
        assert (version, labels) == ("1", TOPICS)
        np.testing.assert_allclose(probs, reference(dirs["A"]), atol=1e-4)
    with start(repo, dirs["B"], admin_token=ADMIN, import_root=dirs["root"] / "incoming") as srv:
        version, labels, probs = served(srv)  # the new path, not A's weights and labels
        assert (version, labels) == ("2", TOXICITY)
        np.testing.assert_allclose(probs, reference(dirs["B"]), atol=1e-4)
        assert "registered as version 2 (was 1: " in srv.log_tail(20_000)
        r = requests.post(
            f"{srv.base_url}/update_model",
            json={"model": "topics", "path": str(dirs["C"])},
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["version"] == "3", r.text
    with start(repo, dirs["B"]) as srv:  # the same configuration: the hot reload stands
        version, _, probs = served(srv)
        assert version == "3"
        np.testing.assert_allclose(probs, reference(dirs["C"]), atol=1e-4)
    with start(repo, dirs["A"]) as srv:  # the configuration went back to A: A's version again
        version, labels, _ = served(srv)
        assert (version, labels) == ("1", TOPICS)
    assert sorted(p.name for p in (repo / "topics").iterdir() if p.name.isdigit()) == ["1", "2", "3"]


def test_a_missing_directory_is_named_and_never_looked_up_on_a_hub(dirs, tmp_path):
    repo = tmp_path / "repo"
    gone = shutil.copytree(dirs["A"], tmp_path / "soon-gone")
    with start(repo, gone):
        pass
    shutil.rmtree(gone)
    srv = start(repo, gone).start(wait=False)  # configured as before; its directory was deleted
    try:
        why = srv.wait_failed()["models"]["topics"]
        assert f"directory {gone} does not exist" in why and "version 1" in why
        assert "Repo id" not in srv.log_tail(50_000) and "huggingface.co" not in srv.log_tail(50_000)
    finally:
        srv.stop()
    typo = tmp_path / "typo"
    srv = start(repo, typo).start(wait=False)  # a new path that does not exist: nothing registered
    try:
        why = srv.wait_failed()["models"]["topics"]
        assert f"the configured directory {typo} does not exist" in why
        r = requests.post(f"{srv.base_url}/infer/topics", json={"texts": TEXTS}, timeout=10)
        assert r.status_code == 503  # not the old version in the configuration's place
    finally:
        srv.stop()
    assert (repo / "topics" / "CURRENT").read_text().strip() == "1" and not (repo / "topics" / "2").exists()

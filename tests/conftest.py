"""Shared fixtures: one real Gunicorn server with MiniLM and the example policy for the session."""

from __future__ import annotations

import os

import pytest

from models.registry import default_minilm_path
from tests import serverproc
from tests.serverproc import ServerProcess

# Test servers plan without torch.compile: every test model's first plan would otherwise compile for
# 20-50 s. The compiled engine is tested in process (tests/unit/test_engine_each.py), and the README's
# commands (tests/docs) start servers on the defaults, compile included.
serverproc.DEFAULTS["torch_compile"] = False

#: every generation backend a generation server fixture is parametrized over (a test id names it);
#: OpenVINO runs in fp32 there, so greedy tokens equal transformers' (its bf16 check is in unit tests)
GENERATION_BACKENDS = ["loop", pytest.param("openvino", marks=pytest.mark.openvino)]


def backend_settings(backend: str) -> dict:
    """The server settings that put a causal LM on `backend`."""
    return {"generation_backend": backend, "precision": "fp32"} if backend == "openvino" else {}

#: MiniLM's directory: the package's, or a model of its shape where the package cannot travel (the GPU
#: check builds a random-weight twin on the device machine and names it here)
MINILM = os.environ.get("BINSERVE_TEST_MINILM") or default_minilm_path()
MODELS = f"minilm=hf_encoder:{MINILM},policy=torch_module:models/policy_v1"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server():
    """binserve under Gunicorn with 2 gthread workers, MiniLM (default) and the policy model."""
    with ServerProcess(workers=2, models=MODELS, cache_dir="") as srv:  # the default cache, in the repository
        yield srv


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """The tiny random Llama (models/examples/causal_lm.py) the generation tests serve, written once."""
    from models.examples.causal_lm import write_causal_lm

    return write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=2, hidden=64)


@pytest.fixture(scope="session")
def hf_lm(lm_dir):
    """That model and its tokenizer in this process, for the references."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(lm_dir).eval(), AutoTokenizer.from_pretrained(lm_dir)

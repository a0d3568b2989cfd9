"""Documents 002 (LitServe: an image classifier, an OpenAI-compatible LLM) and 003 (the LLM serving
system): their clients as written, against real Gunicorn on the port they call (localhost:8000).

002's `llm_client.py` streams a chat from `model="smol-lm"` ("the name doesn't matter": the server
runs with `--openai-any-model true`), and a LitServe client posts `{"image": <base64>}` to
`/predict`. 003's Python and JavaScript `LLMClient` examples run whole, usage included.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from transformers import AutoImageProcessor, ViTForImageClassification

from models.examples.causal_lm import write_causal_lm
from models.examples.vision import write_vision_model
from tests.conftest import GENERATION_BACKENDS, backend_settings
from tests.seeds.conftest import VERBATIM, code_block, document, port_free
from tests.serverproc import ServerProcess

PORT = 8000  # what both documents' clients call
LITSERVE, LLM = VERBATIM / "litserve_002", VERBATIM / "llm_003"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {"lm": write_causal_lm(root / "lm", layers=2, hidden=64), "pets": write_vision_model(root / "pets")}


@pytest.fixture(scope="module", params=GENERATION_BACKENDS)
def srv(request, dirs, tmp_path_factory):
    if not port_free(PORT):
        pytest.fail(f"port {PORT} (the documents') is taken on this machine")
    models = f"pets=hf_image:{dirs['pets']},lm=hf_causal_lm:{dirs['lm']}"
    repo, backend = tmp_path_factory.mktemp("repo"), backend_settings(request.param)
    with ServerProcess(port=PORT, workers=1, models=models, openai_any_model="true", model_repository=repo,
                       **backend) as server:  # fmt: skip
        yield server


def test_the_copies_are_the_documents_own():
    assert (LITSERVE / "llm_client.py").read_text() == code_block(document("002"), "Create `llm_client.py`")
    doc = document("003")
    assert (LLM / "llm_client.py").read_text() == code_block(doc, "#### Python Client")
    assert (LLM / "llm_client.js").read_text() == code_block(doc, "#### JavaScript Client", "javascript")


def test_litserves_openai_client_streams_a_chat_whatever_the_model_name(srv):
    run = subprocess.run([sys.executable, str(LITSERVE / "llm_client.py")], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.strip()) > 0  # the streamed text (a random model's: words of its vocabulary)


def test_a_litserve_image_client_gets_top_predictions(srv, dirs):
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    reply = requests.post("http://127.0.0.1:8000/predict",
                          json={"image": base64.b64encode(buf.getvalue()).decode()}, timeout=60)  # fmt: skip
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    processor = AutoImageProcessor.from_pretrained(dirs["pets"])
    model = ViTForImageClassification.from_pretrained(dirs["pets"]).eval()
    with torch.inference_mode():
        probs = model(**processor(Image.open(io.BytesIO(buf.getvalue())), return_tensors="pt")).logits.softmax(-1)[0]
    order = probs.argsort(descending=True)[: len(predictions)]
    assert [p["label"] for p in predictions][:1] == [model.config.id2label[int(order[0])]]
    np.testing.assert_allclose([p["probability"] for p in predictions], probs[order].numpy(), atol=0.02)
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)


def test_the_llm_documents_python_client_runs_as_written(srv):
    run = subprocess.run([sys.executable, str(LLM / "llm_client.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout) > 0


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (Debian 'nodejs'; .ci/run installs it)")
def test_the_llm_documents_javascript_client_runs_as_written(srv):
    run = subprocess.run(["node", str(LLM / "llm_client.js")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout) > 0

"""The hf_image adapter against transformers' own processor and model run directly, and torch_module
inputs that take encoded images (in process, with the example ViTs of models/examples/vision.py)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

from binserve.engines.settings import RuntimeSettings
from binserve.errors import InvalidInput, LimitExceeded
from models.base import AdapterOptions, RequestLimits
from models.examples.policy import write_model_dir as write_policy
from models.examples.vision import PET_LABELS, write_vision_model
from models.registry import ModelSpec, load_model
from tests.images import encode, photo

CPU = torch.device("cpu")
FP32 = AdapterOptions(runtime=RuntimeSettings("torch", "fp32"))


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return write_vision_model(tmp_path_factory.mktemp("pets") / "pets", "classifier")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return write_vision_model(tmp_path_factory.mktemp("vit") / "vit", "encoder")


def load(path, adapter="hf_image", options=FP32):
    return load_model(ModelSpec("m", adapter, str(path)), CPU, options)


def run(model, payload: dict) -> dict:
    v = model.validate(payload)
    return model.join(model.run_batch(v.samples), v.batched, v.options)


def reference(path, data: list[bytes], task: str) -> np.ndarray:
    """transformers' processor and model on the same images, decoded by Pillow."""
    processor = AutoImageProcessor.from_pretrained(path)
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        if task == "classification":
            return AutoModelForImageClassification.from_pretrained(path).eval()(**inputs).logits.softmax(-1).numpy()
        out = AutoModel.from_pretrained(path).eval()(**inputs).pooler_output
        return torch.nn.functional.normalize(out, dim=1).numpy()


def formats(seed: int = 0) -> list[bytes]:
    """The same kind of photo as JPEG, PNG and WebP, at three sizes (they batch together)."""
    return [encode(photo(480, 640, seed), "JPEG"), encode(photo(300, 200, seed + 1), "PNG"),
            encode(photo(64, 96, seed + 2), "WEBP", quality=90)]  # fmt: skip


def test_classifier_matches_transformers_for_every_format_and_encoding(pets):
    model = load(pets)
    data = formats()
    want = reference(pets, data, "classification")
    b64 = [base64.b64encode(d).decode() for d in data]
    urls = [f"data:image/x;base64,{b}" for b in b64]
    for images in (data, b64, urls):
        got = run(model, {"images": images})
        np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
        assert got["labels"] == [[PET_LABELS[i]] for i in want.argmax(1)]
    one = run(model, {"images": data[0], "top_k": 2})
    assert one["probabilities"].shape == (5,) and len(one["labels"]) == 2
    np.testing.assert_allclose(one["probabilities"], want[0], atol=1e-5)
    assert one["scores"] == pytest.approx(sorted(want[0], reverse=True)[:2], abs=1e-5)


def test_vision_encoder_gives_normalised_embeddings_like_its_pooled_output(vit):
    data = formats(5)
    got = run(load(vit), {"images": data})["embeddings"]
    np.testing.assert_allclose(got, reference(vit, data, "embedding"), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_the_plan_gates_every_engine_it_uses_onnx_included(pets):
    model = load(pets, options=AdapterOptions(runtime=RuntimeSettings("auto", "auto")))
    model.prepare()
    trials = {t.engine: t for t in model.plan.trials}
    assert trials["onnx-fp32"].passed is True, trials["onnx-fp32"]  # the exported ImageHead agrees with torch
    assert all(trials[e].passed is not False for e in model.plan.engines)


def test_validate_times_the_decoding_and_checks_the_payload(pets):
    model = load(pets)
    v = model.validate({"images": formats()})
    assert v.batched and len(v.samples) == 3 and v.timing["decode-image"] > 0
    assert all(s.shape == (3, 64, 64) and s.dtype == np.float32 for s in v.samples)
    for payload, error, match in (
        ({"texts": ["a cat"]}, InvalidInput, "expected 'images'"),
        ({"images": formats()[0], "colour": 1}, InvalidInput, "unexpected keys \\['colour'\\]"),
        ({"images": formats()[0], "top_k": 9}, InvalidInput, "'top_k' must be an int in \\[1, 5\\]"),
        ({"images": [formats()[0], 3]}, InvalidInput, "'images'\\[1\\] must be an encoded image"),
        ({"images": [b"GIF89a"]}, InvalidInput, "'images'\\[0\\] is not a JPEG, PNG or WebP image"),
    ):
        with pytest.raises(error, match=match):
            model.validate(payload)
    few = load(pets, options=AdapterOptions(FP32.runtime, RequestLimits(max_samples=2)))
    with pytest.raises(LimitExceeded, match="holds 3 samples"):
        few.validate({"images": formats()})


def test_a_directory_without_its_preprocessing_is_refused_at_load(pets, tmp_path):
    import shutil

    copy = shutil.copytree(pets, tmp_path / "p")
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        load(copy)
    cfg = json.loads((pets / "preprocessor_config.json").read_text()) | {"image_processor_type": "Owlv2ImageProcessor"}
    (copy / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'Owlv2ImageProcessor' is not one binserve reproduces"):
        load(copy)


def test_a_torch_module_input_declared_as_an_image_takes_jpegs_as_well_as_arrays(tmp_path):
    path = write_policy(tmp_path / "policy")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["inputs"]["image"]["image"] = {"resample": "bilinear"}  # any size in, resized to 480 x 640
    (path / "manifest.json").write_text(json.dumps(manifest))
    model = load(path, "torch_module")
    assert next(t for t in model.input_tensors() if t.name == "image").encoding == "image"
    img, state = photo(240, 320, 3), np.arange(6, dtype=np.float32) / 6
    jpeg = encode(img, "JPEG", quality=95)
    as_array = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((640, 480), Image.BILINEAR))
    want = run(model, {"image": as_array, "state": state})["action"]
    v = model.validate({"image": jpeg, "state": state})
    assert v.timing["decode-image"] > 0 and not v.batched
    np.testing.assert_allclose(model.join(model.run_batch(v.samples), False)["action"], want, atol=1e-6)
    batch = run(model, {"image": [jpeg, jpeg], "state": np.stack([state, state])})["action"]
    np.testing.assert_allclose(batch, np.stack([want, want]), atol=1e-6)
    with pytest.raises(InvalidInput, match="disagree on the batch size"):
        model.validate({"image": [jpeg, jpeg], "state": state})

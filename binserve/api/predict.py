"""`POST /predict`: the encoder server's classification route (document 001) and LitServe's default
route for an image classifier (document 002), told apart by the body's keys.

design: a translation onto the shared pipeline, like every protocol. `{"texts": str | [str],
"model_name"?, "max_length"?}` runs a text classifier (the named model, else the default) and
answers `{request_id, results, processing_time, model_used}` - `results` one object for one string,
a list for a list, each `{prediction: argmax index, probabilities, text}`. `{"image": <base64>}`
runs an image classifier (the default model when it takes images, else the first served one that
does) and answers its top predictions `{"predictions": [{label, probability}, ...]}`. A model that
gives no probabilities (an embedder) is a 400 saying which route serves it. Same keys, quotas,
deadlines, limits and metrics as `/infer` (the native family).
"""

from __future__ import annotations

import time

import numpy as np
from flask import Blueprint, jsonify

from binserve.api.context import context
from binserve.api.hooks import inference_view
from binserve.api.pipeline import Pipeline
from binserve.errors import BadRequest, ModelNotFound

TEXT_FIELDS = {"texts", "model_name", "max_length"}
IMAGE_FIELDS = {"image", "top_k"}
#: predictions an image reply lists when the request does not say (LitServe's examples show the top 5)
IMAGE_TOP_K = 5


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The /predict route on `pipeline`."""
    bp = Blueprint("predict", __name__)

    @bp.post("/predict")
    @inference_view("predict")
    def predict():
        pipeline.admit("native")
        deadline = pipeline.deadline()
        body = pipeline.json_object()
        if "image" in body:
            return _image(pipeline, body, deadline)
        if "texts" in body:
            return _texts(pipeline, body, deadline)
        raise BadRequest(
            f"/predict takes {{'texts': str or [str], 'model_name'?, 'max_length'?}} (text classifiers) or "
            f"{{'image': base64}} (image classifiers); got keys {sorted(body)}"
        )

    return bp


def _only(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; /predict takes {sorted(allowed)}")


def _probabilities(reply: dict, name: str, adapter_name: str) -> np.ndarray:
    if "probabilities" not in reply:
        raise BadRequest(f"model {name!r} is not a classifier (a {adapter_name} model without labels): /predict "
                         "answers classifiers; POST /infer (or /v1/embeddings) serves it")  # fmt: skip
    return np.asarray(reply["probabilities"], dtype=np.float64)


def _texts(pipeline: Pipeline, body: dict, deadline: float):
    _only(body, TEXT_FIELDS)
    name = body.get("model_name")
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"'model_name' must be a model name (a string), got {type(name).__name__}")
    texts = body["texts"]
    payload = {"texts": texts} | ({"max_length": body["max_length"]} if body.get("max_length") is not None else {})
    loaded = pipeline.model(name)
    outcome = pipeline.infer(loaded, payload, deadline)
    probs = _probabilities(outcome.reply, loaded.name, loaded.adapter.adapter_name)
    rows = [probs] if probs.ndim == 1 else list(probs)
    listed = [texts] if isinstance(texts, str) else texts
    results = [{"prediction": int(np.argmax(p)), "probabilities": [float(v) for v in p], "text": t}
               for p, t in zip(rows, listed, strict=True)]  # fmt: skip
    reply = {
        "request_id": context().request_id,
        "results": results[0] if isinstance(texts, str) else results,
        "processing_time": round(time.monotonic() - context().started, 6),
        "model_used": loaded.name,
    }
    return jsonify(reply), 200, outcome.headers(0.0)


def _image_model(pipeline: Pipeline):
    default = pipeline.model(None)
    if any(t.name == "images" for t in default.adapter.input_tensors()):
        return default
    for m in pipeline.manager.served():
        if any(t.name == "images" for t in m.adapter.input_tensors()):
            return pipeline.model(m.name)
    raise ModelNotFound("no served model takes images ('image' in /predict needs an image classifier)")


def _image(pipeline: Pipeline, body: dict, deadline: float):
    _only(body, IMAGE_FIELDS)
    if not isinstance(body["image"], str):
        raise BadRequest("'image' must be one image as a base64 string (or a data URL)")
    loaded = _image_model(pipeline)
    payload = {"images": body["image"]}
    outcome = pipeline.infer(loaded, payload | ({"top_k": body["top_k"]} if "top_k" in body else {}), deadline)
    probs = _probabilities(outcome.reply, loaded.name, loaded.adapter.adapter_name)
    labels, scores = outcome.reply.get("labels"), outcome.reply.get("scores")
    if "top_k" not in body:  # the top five (or every label, when fewer), best first
        order = np.argsort(-probs, kind="stable")[: min(IMAGE_TOP_K, probs.shape[-1])]
        names = getattr(loaded.adapter, "labels", None) or [str(i) for i in range(probs.shape[-1])]
        labels, scores = [names[i] for i in order], [float(probs[i]) for i in order]
    predictions = [{"label": label, "probability": float(p)} for label, p in zip(labels, scores, strict=True)]
    return jsonify(predictions=predictions, model_used=loaded.name), 200, outcome.headers(0.0)

"""OpenAI-compatible routes: `POST /v1/embeddings`, `GET /v1/models[/{model}]`.

design: the `openai` package works unmodified with `base_url=http://host:port/v1`: `input` is a
string, a list of strings, token ids or a list of token-id lists; `encoding_format` is `float` or
`base64` (little-endian float32, what the package asks for by default); `dimensions` is refused
unless it is the model's own (these models were not trained to be truncated); `usage` counts the
tokens the model saw. The inference bearer token applies (the package sends `Authorization:
Bearer <api_key>`). Errors have OpenAI's shape; the request runs through the shared pipeline and is
batched with native requests for the same model.
"""

from __future__ import annotations

import base64
import os
import time

import numpy as np
from flask import Blueprint, Response, jsonify

from binary_protocol import dict_to_json
from binserve.api.context import context
from binserve.api.failures import Failure
from binserve.api.hooks import cors_view, inference_view
from binserve.api.pipeline import Pipeline
from binserve.errors import BadRequest, InvalidInput

PREFIX = "/v1"
_CATEGORY = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}


def error_body(failure: Failure) -> dict:
    """OpenAI's error shape; `code` keeps binserve's own error type."""
    category = _CATEGORY.get(failure.status, "invalid_request_error" if failure.status < 500 else "server_error")
    return {"error": {"message": failure.message, "type": category, "param": None, "code": failure.type}}


def _model_object(loaded) -> dict:
    try:  # when the version was written: the closest thing to OpenAI's `created`
        created = int(os.path.getmtime(loaded.adapter.model_dir))
    except OSError:
        created = 0
    return {"id": loaded.name, "object": "model", "created": created, "owned_by": "binserve"}


def _payload(value) -> dict:
    """The encoder payload for OpenAI's `input`."""
    if isinstance(value, str):
        return {"texts": [value]}
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return {"texts": value}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return {"input_ids": [value]}
        if all(isinstance(v, list) for v in value):
            return {"input_ids": value}
    raise InvalidInput(
        "'input' must be a string, a non-empty list of strings, a list of token ids, or a list of token-id lists"
    )


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The /v1 routes on `pipeline`."""
    bp = Blueprint("openai", __name__, url_prefix=PREFIX)
    manager = pipeline.manager

    @bp.get("/models")
    @cors_view
    def list_models():
        pipeline.authorize("openai")
        visible = set(pipeline.policy.visible(context().admission, [m.name for m in manager.served()]))
        return jsonify(object="list", data=[_model_object(m) for m in manager.served() if m.name in visible])

    @bp.get("/models/<model:model>")
    @cors_view
    def get_model(model: str):
        pipeline.authorize("openai")
        return jsonify(_model_object(pipeline.model(model)))

    @bp.post("/embeddings")
    @inference_view("openai")
    def embeddings():
        pipeline.admit("openai")
        body = pipeline.json_object()
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise BadRequest(f"unknown fields {unknown}; /v1/embeddings takes {sorted(_FIELDS)}")
        name = body.get("model")
        if not isinstance(name, str):
            raise BadRequest("'model' must name a served model (GET /v1/models lists them)")
        loaded = pipeline.model(name)
        signature = loaded.signature
        if "embeddings" not in signature:
            raise BadRequest(f"model {name!r} does not produce embeddings (its outputs: {sorted(signature)})")
        width = signature["embeddings"][0][-1]
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}")
        dims = body.get("dimensions")
        if dims is not None and (type(dims) is not int or dims != width):
            raise BadRequest(f"model {name!r} makes {width}-dimensional embeddings and cannot shorten them")
        if "input" not in body:
            raise BadRequest("'input' is required")
        outcome = pipeline.infer(loaded, _payload(body["input"]), pipeline.deadline())
        encode_start = time.monotonic()
        vectors = np.asarray(outcome.reply["embeddings"], dtype="<f4")
        if encoding == "base64":
            items = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
        else:
            items = vectors
        tokens = sum(len(s) for s in outcome.validated.samples)
        reply = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
            "model": loaded.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        body = dict_to_json(reply)
        return Response(body, content_type="application/json", headers=outcome.headers(time.monotonic() - encode_start))

    return bp

"""binserve's own protocol: `POST /infer[/<model>]` with a framed, pickle or JSON body.

A body with `models` fans out to several models (`fanout.py`); the reply then maps each model's
name to its outputs.

design: decode with the safe decoder (`binary_protocol`), run through the shared pipeline, and
answer in the request's format (or the one `Accept` names) with the model's outputs only; the
metadata travels in headers. Beside the outputs every one-model reply carries `"status": "ok"` (the Flask
card's client checks `result["status"] == "ok"`; an output of the model's own named `status` keeps its
value); a fan-out reply stays a map of model names, which its clients iterate.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, request

from binary_protocol import encode_body, reply_format
from binserve.api.fanout import fan_out
from binserve.api.hooks import inference_view
from binserve.api.pipeline import Pipeline
from binserve.errors import BadRequest


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The /infer routes on `pipeline`."""
    bp = Blueprint("native", __name__)

    @bp.post("/infer", defaults={"model": None})
    @bp.post("/infer/<model:model>")
    @inference_view("native")
    def infer(model: str | None):
        pipeline.admit("native")
        deadline = pipeline.deadline()
        if model is not None:
            loaded = pipeline.model(model)
        payload, fmt = pipeline.decode()
        if "models" in payload:
            if model is not None:
                raise BadRequest(f"name the models in the URL ({model!r}) or in 'models', not both")
            served = fan_out(pipeline, payload, deadline)
            reply = served.replies
        else:
            served = pipeline.infer(loaded if model is not None else pipeline.model(None), payload, deadline)
            reply = served.reply if "status" in served.reply else {**served.reply, "status": "ok"}
        encode_start = time.monotonic()
        body, content_type = encode_body(reply, reply_format(fmt, request.headers.get("Accept")))
        return Response(body, content_type=content_type, headers=served.headers(time.monotonic() - encode_start))

    return bp

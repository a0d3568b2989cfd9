"""binserve's own protocol: `POST /infer[/<model>]` with a framed, pickle or JSON body.

design: decode with the safe decoder (`binary_protocol`), run through the shared pipeline, and
answer in the request's format (or the one `Accept` names) with the model's outputs only; the
metadata travels in headers.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, request

from api.pipeline import Pipeline, inference_view
from binary_protocol import encode_body, reply_format


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The /infer routes on `pipeline`."""
    bp = Blueprint("native", __name__)

    @bp.post("/infer", defaults={"model": None})
    @bp.post("/infer/<model>")
    @inference_view("native")
    def infer(model: str | None):
        pipeline.authorize()
        deadline = pipeline.deadline()
        loaded = pipeline.model(model)
        payload, fmt = pipeline.decode()
        outcome = pipeline.infer(loaded, payload, deadline)
        encode_start = time.monotonic()
        body, content_type = encode_body(outcome.reply, reply_format(fmt, request.headers.get("Accept")))
        return Response(body, content_type=content_type, headers=outcome.headers(time.monotonic() - encode_start))

    return bp

"""`POST /classify`: document 000's capability server on the shared pipeline.

design: `{"texts": [...], "capabilities": [...]}` is checked here (texts: 1..max_queue_samples
strings of at most max_text_chars; capabilities: known names, default classification), then each
text goes to the capability batcher as one sample and the reply lists the request's own texts in
order with only the capabilities asked: `{"request_id", "results": [{"text", "<capability>": ...}],
"processing_time"}`. Same keys, quotas, deadlines and metrics as /infer (the native family).
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from binserve.api.context import context
from binserve.api.hooks import inference_view
from binserve.api.pipeline import Pipeline, client_gone_check
from binserve.capabilities.config import CAPABILITIES, Sample
from binserve.errors import BadRequest, DeadlineExceeded, LimitExceeded, ModelNotFound
from binserve.observability import metrics

FIELDS = {"texts", "capabilities"}
#: characters per text when max_text_chars is 0: 32 x the capability server's max_length, at most 1 MiB
_DEFAULT_CHARS = 1 << 20


def blueprint(pipeline: Pipeline, service) -> Blueprint:
    """The /classify route on `pipeline` and the worker's CapabilityService (None: not configured)."""
    bp = Blueprint("classify", __name__)
    config = pipeline.config
    max_chars = config.max_text_chars or min(_DEFAULT_CHARS, 32 * config.max_length)

    @bp.post("/classify")
    @inference_view("classify")
    def classify():
        pipeline.admit("native")
        if service is None:
            raise ModelNotFound("this server has no capability configuration: start it with --config topics.json "
                                "(README: From the LLM classification server)")
        deadline = pipeline.deadline()
        body = pipeline.json_object()
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise BadRequest(f"unknown fields {unknown}; /classify takes {sorted(FIELDS)}")
        texts = body.get("texts")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("'texts' must be a non-empty list of strings")
        if len(texts) > config.max_queue_samples:
            raise LimitExceeded(f"'texts' holds {len(texts)} texts; one request may hold {config.max_queue_samples} "
                                "(max_queue_samples): split it")  # fmt: skip
        long = next((i for i, t in enumerate(texts) if len(t) > max_chars), None)
        if long is not None:
            raise LimitExceeded(f"text {long} of 'texts' has {len(texts[long])} characters; at most {max_chars}")
        caps = body.get("capabilities", ["classification"])
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise BadRequest(f"'capabilities' must be a non-empty list of names; known: {list(CAPABILITIES)}")
        bad = sorted(set(caps) - set(CAPABILITIES))
        if bad:
            raise BadRequest(f"unknown capabilities {bad}; known: {list(CAPABILITIES)}")
        wanted = frozenset(caps)
        future = service.batcher.submit([Sample(t, wanted) for t in texts], deadline,
                                        client_gone_check(request.environ))  # fmt: skip
        try:
            result = future.result(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded("the request's deadline passed while its batch was still running") from None
        metrics.CLASSIFY_REQUESTS.inc()
        metrics.CLASSIFY_TEXTS.inc(len(texts))
        ctx = context()
        return jsonify(request_id=ctx.request_id, results=result.outputs,
                       processing_time=round(time.monotonic() - ctx.started, 6))  # fmt: skip

    return bp

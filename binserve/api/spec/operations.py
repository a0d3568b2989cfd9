"""What each route (by its Flask endpoint) takes and answers, for the OpenAPI document.

design: keyed by endpoint, so the document is built from the routes the app really registers
(binserve.api.spec.document) and a route without an entry here fails the build and its test.
Each protocol's errors keep its own shape: native and seed routes `{"error": {"type", "message"}}`,
V2 `{"error": "<message>"}`, OpenAI `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from binary_protocol import IMAGE_MEDIA_TYPES
from binserve.api.spec import schemas as s

BINARY_TYPES = ("application/x-binserve-framed", "application/x-binserve-pickle")
_WIRE = "the binary formats are README.md, 'The wire format'"

_STATUS = {
    "400": "bad input: the message names the field and what was expected",
    "401": "no or unknown bearer token",
    "403": "the key may not use this route or model",
    "404": "unknown model or version",
    "408": "the client stalled sending its request",
    "413": "over a limit (README: Limits)",
    "415": "unsupported Content-Type",
    "429": "queue full or quota spent; Retry-After says when to retry",
    "500": "the model failed on the request's batch (only that batch's requests fail)",
    "503": "loading, draining, or the model is not ready",
    "504": "the request's deadline (or a reload's timeout_s) passed first",
    "507": "the model repository's volume is full",
}
INFERENCE_ERRORS = ("400", "401", "403", "404", "408", "413", "415", "429", "500", "503", "504")


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def errors(shape: dict, codes=INFERENCE_ERRORS) -> dict:
    return {c: {"description": _STATUS[c], "content": _json(shape)} for c in codes}


def op(summary: str, tag: str, ok: dict, *, body: dict | None = None, errs: dict | None = None,
       auth: str | None = "inference", ok_code: str = "200", description: str = "",
       body_required: bool = True) -> dict:  # fmt: skip
    """An operation: `ok` is the 2xx reply's content, `body` the request's; `auth`: which token."""
    out = {"summary": summary, "tags": [tag], "responses": {ok_code: {"description": "OK", "content": ok}}}
    if description:
        out["description"] = description
    if body is not None:
        out["requestBody"] = {"required": body_required, "content": body}
    out["responses"].update(errs or {})
    if auth == "inference":
        out["security"] = [{"bearer": []}, {}]  # a token only when the server has keys or auth_token
    elif auth == "admin":
        out["security"] = [{"admin": []}]
    return out


def _binary() -> dict:
    return {t: {"schema": {"type": "string", "format": "binary", "description": _WIRE}} for t in BINARY_TYPES}


_IMAGE_BODY = {
    t: {"schema": {"type": "string", "format": "binary", "description": "one encoded image: the request "
                                                                       "{\"images\": <these bytes>}, answered in JSON"}}
    for t in IMAGE_MEDIA_TYPES
}  # fmt: skip
_NATIVE_IO = {**_json(s.NATIVE_REQUEST), **_binary(), **_IMAGE_BODY}
_NATIVE_OUT = {**_json(s.NATIVE_REPLY), **_binary()}
_V2_BINARY = {
    "application/octet-stream": {
        "schema": {"type": "string", "format": "binary",
                   "description": "V2 binary tensor extension: the JSON header (its length in the "
                                  "Inference-Header-Content-Length header), then each tensor's bytes"}}
}  # fmt: skip
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
# with stream: true; one server-sent event per batch of tokens (a validator reads each event as an object)
_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {"type": "string", "description": "a JSON chunk (OpenAI routes end with the event "
                                                          "`data: [DONE]`)"},
                "event": {"type": "string"},
            },
        }
    }
}  # fmt: skip
_EMPTY = {}

OPERATIONS: dict[str, dict[str, dict]] = {
    "native.infer": {
        "post": op(
            "Run a model (the default, or the one named in the path) on one sample or a batch",
            "native",
            _NATIVE_OUT,
            body=_NATIVE_IO,
            errs=errors(s.NATIVE_ERROR),
            description="The reply comes in the request's format unless Accept asks for another. Headers: "
            "X-Request-Id, X-Model-Version, X-Batch-Size, Server-Timing.",
        )
    },  # fmt: skip
    "predict.predict": {
        "post": op(
            "Classify texts (the encoder server's /predict) or one base64 image (LitServe's default route)",
            "native",
            _json(s.PREDICT_REPLY),
            body=_json(s.PREDICT_REQUEST),
            errs=errors(s.NATIVE_ERROR),
        )
    },  # fmt: skip
    "classify.classify": {
        "post": op(
            "Document 000's capability server: classification, recommendations and alerts for each text, each "
            "capability run once per batch over the texts that need it (needs --config)",
            "native",
            _json(s.CLASSIFY_REPLY),
            body=_json(s.CLASSIFY_REQUEST),
            errs=errors(s.NATIVE_ERROR),
        )
    },  # fmt: skip
    "health.healthz": {"get": op("200 while the process is alive", "health", _json(s.OBJECT), auth=None)},
    "health.readyz": {
        "get": op(
            "200 once every worker has every model loaded and warm, else 503 with the reasons",
            "health",
            _json(s.OBJECT),
            auth=None,
            errs={"503": {"description": _STATUS["503"], "content": _json(s.OBJECT)}},
        )
    },
    "health.health": {
        "get": op(
            "Every source document's health probe: 200 \"healthy\" once every model is ready (any kind), else 503 "
            "naming what is loading; with per-model stats",
            "health",
            _json(s.HEALTH),
            auth=None,
            errs={"503": {"description": _STATUS["503"], "content": _json(s.HEALTH)}},
        )
    },  # fmt: skip
    "health.model_info": {
        "get": op(
            "The default model's class, device and parameter count (the Flask card's /model_info)",
            "health",
            _json(s.MODEL_INFO),
            auth=None,
            errs={"503": {"description": _STATUS["503"], "content": _json(s.MODEL_INFO_ERROR)}},
        )
    },  # fmt: skip
    "health.models": {
        "get": op("Every model: version, adapter, device, inputs, batching", "health", _json(s.OBJECT), auth=None)
    },  # fmt: skip
    "v2.server_metadata": {"get": op("V2 server metadata", "v2", _json(s.V2_SERVER), auth=None)},
    "v2.live": {"get": op("V2 liveness: 200 while the process runs", "v2", _EMPTY, auth=None)},
    "v2.ready": {
        "get": op(
            "V2 readiness: 200 when ready, 503 while loading or draining",
            "v2",
            _EMPTY,
            auth=None,
            errs=errors(s.V2_ERROR, ("503",)),
        )
    },  # fmt: skip
    "v2.metadata": {
        "get": op(
            "V2 model metadata: inputs, outputs, versions",
            "v2",
            _json(s.V2_METADATA),
            auth=None,
            errs=errors(s.V2_ERROR, ("404",)),
        )
    },  # fmt: skip
    "v2.model_ready": {
        "get": op("V2 model readiness", "v2", _EMPTY, auth=None, errs=errors(s.V2_ERROR, ("404", "503")))
    },  # fmt: skip
    "v2.infer": {
        "post": op(
            "V2 inference with JSON tensors or the binary tensor extension",
            "v2",
            {**_json(s.V2_REPLY), **_V2_BINARY},
            body={**_json(s.V2_REQUEST), **_V2_BINARY},
            errs=errors(s.V2_ERROR),
        )
    },
    "openai.list_models": {
        "get": op(
            "OpenAI: the served models", "openai", _json(s.OPENAI_MODELS), errs=errors(s.OPENAI_ERROR, ("401", "403"))
        )
    },  # fmt: skip
    "openai.get_model": {
        "get": op(
            "OpenAI: one model", "openai", _json(s.OPENAI_MODEL), errs=errors(s.OPENAI_ERROR, ("401", "403", "404"))
        )
    },  # fmt: skip
    "openai.embeddings": {
        "post": op(
            "OpenAI embeddings",
            "openai",
            _json(s.OPENAI_EMBEDDINGS_REPLY),
            body=_json(s.OPENAI_EMBEDDINGS_REQUEST),
            errs=errors(s.OPENAI_ERROR),
        )
    },
    "openai_generate.completions": {
        "post": op(
            "OpenAI completions (streamed with stream: true)",
            "openai",
            {**_json(s.OPENAI_COMPLETIONS_REPLY), **_SSE},
            body=_json(s.OPENAI_COMPLETIONS_REQUEST),
            errs=errors(s.OPENAI_ERROR),
        )
    },  # fmt: skip
    "openai_generate.chat_completions": {
        "post": op(
            "OpenAI chat completions (streamed with stream: true)",
            "openai",
            {**_json(s.OPENAI_CHAT_REPLY), **_SSE},
            body=_json(s.OPENAI_CHAT_REQUEST),
            errs=errors(s.OPENAI_ERROR),
        )
    },
    "seed.generate": {
        "post": op(
            "Generate text from a prompt (the seed API)",
            "generation",
            {**_json(s.SEED_GENERATE_REPLY), **_SSE},
            body=_json(s.SEED_GENERATE_REQUEST),
            errs=errors(s.NATIVE_ERROR),
        )
    },  # fmt: skip
    "seed.chat": {
        "post": op(
            "Chat with a generative model (the seed API)",
            "generation",
            {**_json(s.SEED_CHAT_REPLY), **_SSE},
            body=_json(s.SEED_CHAT_REQUEST),
            errs=errors(s.NATIVE_ERROR),
        )
    },  # fmt: skip
    "seed.stats": {
        "get": op(
            "Generation counts since the server started (the seed API)", "generation", _json(s.SEED_STATS), auth=None
        )
    },  # fmt: skip
    "admin.update_model": {
        "post": op(
            "Hot reload: switch to a version, or import a directory as the next one; answers once every "
            "worker of every replica serves it",
            "admin",
            _json(s.OBJECT),
            body=_json(s.UPDATE_MODEL_REQUEST),
            auth="admin",
            errs=errors(s.NATIVE_ERROR, ("400", "401", "403", "404", "413", "500", "503", "504", "507")),
        )
    },
    "admin.metrics_endpoint": {"get": op("Prometheus metrics of every worker", "admin", _TEXT, auth=None)},
    "admin.repository_index": {
        "post": op(
            "V2 model repository index",
            "admin",
            _json({"type": "array"}),
            auth="admin",
            errs=errors(s.V2_ERROR, ("401", "403")),
        )
    },  # fmt: skip
    "admin.control_model": {
        "post": op(
            "V2 model control: load or unload a model; answers once every worker of every replica did it",
            "admin",
            _json(s.OBJECT),
            body=_json(s.CONTROL_MODEL_REQUEST),
            body_required=False,  # tritonclient sends none or an empty one
            auth="admin",
            errs=errors(s.V2_ERROR, ("400", "401", "403", "404", "413", "415", "503", "504")),
        )
    },
}

"""The seed LLM server's API: `POST /generate`, `POST /chat`, `GET /stats` (its `GET /health` is every
document's, in `health.py`), on the same continuous batcher, limits, keys, deadlines and metrics as
the OpenAI routes.

design: the shapes are the seed's. /generate takes `prompt`, `max_tokens`, `temperature`, `top_p`,
`top_k`, `repetition_penalty`, `stop_sequences`, `stream`, `metadata` (an object) and answers `{text,
request_id, tokens_generated, generation_time, tokens_per_second, finish_reason, metadata}` (the
request's metadata plus `model_name` and `backend`, the engine); /chat
takes `messages` and answers `{message: {role, content}, ...}`. Streams are server-sent events
`{"text", "request_id", "tokens_generated"}` ending with `{"text": "", "finish_reason", "final":
true}`. `model` (binserve's addition) names the model; without it, the default model when it
generates, else the first served model that does. /stats counts over every worker (from the
metrics), so any worker answers for the server.
"""

from __future__ import annotations

import json
import os
import time
import weakref

from flask import Blueprint, Response, jsonify

from binserve.api.context import context
from binserve.api.failures import failure_of
from binserve.api.generation import SSE_HEADERS, Generation
from binserve.api.health import not_ready_status
from binserve.api.hooks import inference_view
from binserve.api.pipeline import Pipeline
from binserve.capabilities.config import CAPABILITIES
from binserve.errors import BadRequest, ModelNotFound, ServingError
from binserve.observability import metrics

_SAMPLING = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "repetition_penalty": "repetition_penalty", "stop_sequences": "stop", "seed": "seed"}  # fmt: skip
_FIELDS = {"generate": {"prompt", *_SAMPLING, "stream", "metadata", "model"},
           "chat": {"messages", *_SAMPLING, "stream", "metadata", "model"}}  # fmt: skip
#: the seed's default length of an answer (capped by the model's own limit)
DEFAULT_MAX_TOKENS = 256
#: when the server started (set by gunicorn.conf.py in the master; else this worker's start)
STARTED_AT = float(os.environ.get("BINSERVE_SERVER_STARTED", time.time()))


_REQUESTS, _TOKENS, _SECONDS = (
    "binserve_generation_requests_total", "binserve_generated_tokens_total", "binserve_generation_seconds_total"
)  # fmt: skip


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(adapter) -> str | None:
    """The engine a generative version runs on (from its description, read once per version)."""
    if adapter not in _BACKENDS:
        engines = adapter.describe()["engines"]
        _BACKENDS[adapter] = engines[0] if engines else None
    return _BACKENDS[adapter]


def classify_stats() -> dict:
    """Document 000's batching proof: /classify requests and texts, and per capability the
    executions and the texts they covered, summed over every worker."""
    t = metrics.totals({"binserve_classify_requests_total", "binserve_classify_texts_total"})
    per = metrics.totals_by("capability", list(CAPABILITIES),
                            {"binserve_capability_executions_total", "binserve_capability_texts_total"})  # fmt: skip
    return {
        "requests": int(t["binserve_classify_requests_total"]),
        "texts": int(t["binserve_classify_texts_total"]),
        "capabilities": {cap: {"executions": int(c["binserve_capability_executions_total"]),
                               "texts": int(c["binserve_capability_texts_total"])} for cap, c in per.items()},
    }  # fmt: skip


def uptime_text(seconds: float) -> str:
    """The seed document's uptime: "2 days, 14 hours, 32 minutes" (singular for one; minutes always)."""
    minutes = int(seconds // 60)
    parts = [(minutes // 1440, "day"), (minutes // 60 % 24, "hour"), (minutes % 60, "minute")]
    shown = [(n, unit) for n, unit in parts[:2] if n] + [parts[2]]
    return ", ".join(f"{n} {unit}{'' if n == 1 else 's'}" for n, unit in shown)


def _event(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The seed's routes on `pipeline`."""
    bp = Blueprint("seed", __name__)
    manager = pipeline.manager

    def generative(name) -> str:
        if name is not None:
            if not isinstance(name, str):
                raise BadRequest("'model' must be a model name")
            return name
        if pipeline.model(None).adapter.generates:
            return manager.default_name
        for m in manager.served():
            if m.adapter.generates:
                return m.name
        raise ModelNotFound("no served model generates text")

    def run(kind: str):
        pipeline.admit("generate")
        body = pipeline.json_object()
        unknown = sorted(set(body) - _FIELDS[kind])
        if unknown:
            raise BadRequest(f"unknown fields {unknown}; /{kind} takes {sorted(_FIELDS[kind])}")
        loaded = pipeline.model(generative(body.get("model")))
        adapter = loaded.adapter
        if not adapter.generates:
            raise BadRequest(f"model {loaded.name!r} does not generate text (it is a {adapter.adapter_name} model)")
        values = {ours: body[theirs] for theirs, ours in _SAMPLING.items() if body.get(theirs) is not None}
        values.setdefault("max_new_tokens", min(DEFAULT_MAX_TOKENS, adapter.max_new_tokens))
        names = {ours: theirs for theirs, ours in _SAMPLING.items()}  # errors name the seed's own fields
        params = adapter.sampling(values, names)
        if kind == "chat":
            ids = adapter.chat_prompt(body.get("messages"))
        elif isinstance(body.get("prompt"), str):
            ids = adapter.text_prompt(body["prompt"])
        else:
            raise BadRequest("'prompt' must be a string")
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise BadRequest(f"'metadata' must be an object, got {type(meta).__name__}")
        gen = Generation(pipeline, loaded, adapter.check_prompt(ids, params, names), params)
        rid = context().request_id
        # the document's reply metadata: the request's, plus which model and engine answered
        meta = {**(meta or {}), "model_name": loaded.name, "backend": _backend(adapter)}
        if body.get("stream"):
            gen.start()  # queued now, so that a full queue is a 429 before the 200 goes out
            headers = {**SSE_HEADERS, "X-Model": loaded.name}
            return Response(_stream(gen, rid), mimetype="text/event-stream", headers=headers)
        done = gen.cached(kind, stream=False) or gen.wait()[0]
        seconds, n = gen.elapsed_s, int(done["completion_tokens"])
        reply = {"request_id": rid, "tokens_generated": n, "generation_time": round(seconds, 4),
                 "finish_reason": done["finish_reason"], "metadata": meta}  # fmt: skip
        if kind == "chat":
            reply["message"] = {"role": "assistant", "content": done["text"]}
        else:
            reply["text"] = done["text"]
            reply["tokens_per_second"] = round(n / seconds, 2) if seconds > 0 else 0.0
        return jsonify(reply)

    @bp.post("/generate")
    @inference_view("seed")
    def generate():
        return run("generate")

    @bp.post("/chat")
    @inference_view("seed")
    def chat():
        return run("chat")

    @bp.get("/stats")
    def stats():
        t = metrics.totals({_REQUESTS, _TOKENS, _SECONDS})
        requests_, tokens, seconds = t[_REQUESTS], t[_TOKENS], t[_SECONDS]
        uptime = time.time() - STARTED_AT
        per_request = round(tokens / requests_, 2) if requests_ else 0.0
        per_second = round(tokens / seconds, 2) if seconds else 0.0
        lm = next((m for m in manager.served() if m.adapter.generates), None)
        engines = next((d.get("engines") for d in manager.describe() if lm and d.get("name") == lm.name), None)
        ready = not_ready_status(manager) is None
        return jsonify(
            total_requests=int(requests_),
            total_tokens_generated=int(tokens),
            total_inference_time=round(seconds, 4),
            average_tokens_per_request=per_request,
            average_tokens_per_second=per_second,
            uptime_seconds=round(uptime, 1),
            # the seed document's names for the same figures
            is_loaded=lm is not None,
            is_ready=ready and lm is not None,
            backend_type=engines[0] if engines else None,
            request_count=int(requests_),
            avg_tokens_per_request=per_request,
            avg_time_per_request=round(seconds / requests_, 4) if requests_ else 0.0,
            avg_tokens_per_second=per_second,
            uptime=uptime_text(uptime),
            classify=classify_stats(),
        )

    return bp


def _stream(gen: Generation, rid: str):
    """The seed's events: one per batch of tokens, then the final one (an error, if one came)."""
    try:
        for batch in gen.batches():
            text = "".join(d for _, d in batch)
            if text:
                yield _event({"text": text, "request_id": rid, "tokens_generated": len(gen.seq.output)})
        yield _event({"text": "", "request_id": rid, "tokens_generated": len(gen.seq.output),
                      "finish_reason": gen.seq.finish_reason, "final": True})  # fmt: skip
    except ServingError as err:  # after the 200 went out: the error travels in the stream
        failure = failure_of(err)
        yield _event({"text": "", "request_id": rid, "finish_reason": "error", "final": True,
                      "error": {"type": failure.type, "message": failure.message}})  # fmt: skip

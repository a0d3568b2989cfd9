"""One request, several models: each named model runs once on the request's inputs, batched with
every other request's rows for that model, and the reply maps model name -> its outputs.

design: validate for every model first (tokenizing once per distinct tokenizer, through the
adapters' per-request `shared` space), then submit to every model's batcher before waiting on
any, so the models run at the same time on their own batch threads. All or nothing: the first
model that fails fails the request, with its status and a message naming the model, and the
request's other parts are cancelled where they have not started. One deadline covers the whole
request. `params` carries per-model options (e.g. a classifier's `top_k`), merged into that
model's payload only.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from flask import g

from binserve.api.pipeline import Pipeline, arrival_timing, input_tokens
from binserve.errors import BadRequest, ServingError
from binserve.observability import metrics
from binserve.scheduling.contract import BatchResult

#: models one request may name: more is a malformed or hostile request
MAX_MODELS = 16


@contextlib.contextmanager
def _naming(name: str):
    """A ServingError raised inside, raised again naming the model it came from (same class, status)."""
    try:
        yield
    except ServingError as err:
        raise type(err)(f"model {name!r}: {err.message}", retry_after_s=err.retry_after_s) from None


@dataclass
class FanOutcome:
    """Every model's reply and how its part was served."""

    replies: dict[str, dict]
    results: dict[str, BatchResult]
    started: float
    decoded: float

    def headers(self, encode_s: float) -> dict[str, str]:
        """Per-model versions, batch sizes and times (`queue-<model>`, `infer-<model>` in Server-Timing)."""
        timing = [f"{arrival_timing()}decode;dur={(self.decoded - self.started) * 1000:.2f}"]
        for name, r in self.results.items():
            timing += [f"queue-{name};dur={r.queue_s * 1000:.2f}", f"infer-{name};dur={r.infer_s * 1000:.2f}"]
        timing.append(f"encode;dur={encode_s * 1000:.2f}")
        return {
            "X-Request-Id": g.request_id,
            "X-Model": ",".join(self.results),
            "X-Model-Version": ",".join(f"{n}={r.tag}" for n, r in self.results.items()),
            "X-Batch-Size": ",".join(f"{n}={r.batch_size}" for n, r in self.results.items()),
            "Server-Timing": ", ".join(timing),
        }


def _names(value) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise BadRequest("'models' must be a non-empty list of model names")
    if len(value) > MAX_MODELS:
        raise BadRequest(f"'models' names {len(value)} models; one request may name at most {MAX_MODELS}")
    if len(set(value)) != len(value):
        raise BadRequest(f"'models' names a model twice: {value}")
    return value


def fan_out(pipeline: Pipeline, payload: dict, deadline: float) -> FanOutcome:
    """Run `payload` (inputs + `models` + optional `params`) on every named model; all or nothing."""
    names = _names(payload.pop("models"))
    params = payload.pop("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise BadRequest("'params' must map model names to objects of that model's options")
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise BadRequest(f"'params' names models the request does not: {unknown}")
    try:
        loaded = [pipeline.model(n) for n in names]
    finally:
        g.model_label = metrics.FANOUT_MODEL  # bytes and lookup failures; each model counts its answer
    g.fanout_models = names
    shared: dict = {}
    validated = {}
    for m in loaded:
        with _naming(m.name):
            validated[m.name] = m.adapter.validate({**payload, **params.get(m.name, {})}, shared)
    # each model reads the input: its tokens are charged once per model that runs them
    pipeline.admit_tokens(sum(input_tokens(m.adapter, validated[m.name]) for m in loaded))
    decoded = time.monotonic()
    futures, results = {}, {}
    try:
        for m in loaded:  # every part queued before any is waited on: the models run side by side
            with _naming(m.name):
                futures[m.name] = pipeline.submit(m, validated[m.name], deadline)
        for m in loaded:
            with _naming(m.name):
                results[m.name] = pipeline.wait(m, futures[m.name], deadline)
    finally:
        for f in futures.values():
            f.cancel()  # parts not started yet, when another part failed; a no-op for finished ones
    replies = {}
    for m in loaded:
        r, v = results[m.name], validated[m.name]
        replies[m.name] = m.adapter.join(r.outputs, v.batched, v.options)
    return FanOutcome(replies, results, g.started, decoded)

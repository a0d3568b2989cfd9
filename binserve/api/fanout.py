"""One request, several models: each named model runs once on the request's inputs, batched with
every other request's rows for that model, and the reply maps model name -> its outputs.

design: validate for every model first (tokenizing once per distinct tokenizer, through the
adapters' per-request `shared` space), then hand the parts to the pipeline's core
(`Pipeline.serve`), the same one a one-model request takes: the response cache, the queueing of
every part before any is waited on (the models run at the same time on their own batch threads),
all or nothing, one deadline for the whole request. `params` carries per-model options (e.g. a
classifier's `top_k`), merged into that model's payload only.
"""

from __future__ import annotations

from binserve.api.context import context
from binserve.api.pipeline import Part, Pipeline, Served, input_tokens, naming
from binserve.errors import BadRequest
from binserve.observability import metrics

#: models one request may name: more is a malformed or hostile request
MAX_MODELS = 16


def _names(value) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise BadRequest("'models' must be a non-empty list of model names")
    if len(value) > MAX_MODELS:
        raise BadRequest(f"'models' names {len(value)} models; one request may name at most {MAX_MODELS}")
    if len(set(value)) != len(value):
        raise BadRequest(f"'models' names a model twice: {value}")
    return value


def fan_out(pipeline: Pipeline, payload: dict, deadline: float) -> Served:
    """Run `payload` (inputs + `models` + optional `params`) on every named model; all or nothing."""
    names = _names(payload.pop("models"))
    params = payload.pop("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise BadRequest("'params' must map model names to objects of that model's options")
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise BadRequest(f"'params' names models the request does not: {unknown}")
    ctx = context()
    try:
        loaded = [pipeline.model(n) for n in names]
    finally:
        ctx.model = metrics.FANOUT_MODEL  # bytes and lookup failures; each model counts its answer
    ctx.fanout = names
    shared: dict = {}
    parts = []
    for m in loaded:
        with naming(m.name):
            parts.append(Part(m, m.adapter.validate({**payload, **params.get(m.name, {})}, shared)))
    # each model reads the input: its tokens are charged once per model that runs them
    pipeline.admit_tokens(sum(input_tokens(p.loaded.adapter, p.validated) for p in parts))
    return pipeline.serve(parts, deadline)

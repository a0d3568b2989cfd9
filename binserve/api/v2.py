"""Open Inference Protocol V2 (KServe, Triton) over REST, with the binary tensor extension.

design: routes only translate. Metadata comes from the adapter's declared inputs and the outputs
the loaded version produced at its check (`ModelSlot.signature`), with -1 for the batch dimension
and variable sizes. An inference request's tensors become the adapter's payload (BYTES tensors of
shape [N] or [N, 1] become N texts, or N encoded images for an image input), run through the shared
pipeline - so V2 requests are batched with native requests for the same model - and the outputs go
back in JSON or binary, as asked, in the order the request lists them. A version in the URL must be
the one served (404 otherwise). Errors are `{"error": "<message>"}` with the HTTP status (`failures.py`).
"""

from __future__ import annotations

import time

import numpy as np
from flask import Blueprint, Response, jsonify, request

from binserve.api import v2_tensors
from binserve.api.failures import Failure
from binserve.api.hooks import inference_view
from binserve.api.pipeline import Pipeline
from binserve.config import VERSION
from binserve.errors import BadRequest, InvalidInput, NotReady
from models.contract import TensorSpec

PREFIX = "/v2"
_FAMILY = {"b": "bool", "i": "int", "u": "int", "f": "float"}


def error_body(failure: Failure) -> dict:
    """V2's error shape."""
    return {"error": failure.message}


def _tensor_meta(name: str, dtype, shape) -> dict:
    return {"name": name, "datatype": v2_tensors.datatype_of(dtype), "shape": [-1, *shape]}


def model_metadata(loaded) -> dict:
    """`GET /v2/models/{model}`: name, the served version, inputs and outputs with V2 datatypes."""
    adapter = loaded.adapter
    outputs = [_tensor_meta(k, np.dtype(dt), shape) for k, (shape, dt) in loaded.signature.items()]
    return {
        "name": loaded.name,
        "versions": [adapter.version],
        "platform": f"binserve_{adapter.adapter_name}",
        "inputs": [_tensor_meta(t.name, t.dtype, t.shape) for t in adapter.input_tensors()],
        "outputs": outputs,
    }


def _value(tensor: v2_tensors.Tensor, spec: TensorSpec):
    """The adapter payload value of a V2 input, if its datatype suits the model's input."""
    where = f"input {tensor.name!r}"
    image = spec.encoding == "image"
    if spec.dtype is None or (image and tensor.datatype == "BYTES"):
        what = "an encoded image" if image else "text"
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"{where} is {what}: send it as BYTES, not {tensor.datatype}")
        if len(tensor.shape) == 2 and tensor.shape[1] != 1 or len(tensor.shape) not in (1, 2):
            raise InvalidInput(f"{where}: {what} elements have shape [N] or [N, 1], got {list(tensor.shape)}")
        if image:  # bytes from the binary extension, base64 strings from JSON: the adapter takes both
            return list(tensor.value)
        return [v2_tensors.utf8(v, where, i) for i, v in enumerate(tensor.value)]
    expected = v2_tensors.datatype_of(spec.dtype)
    given = tensor.value
    if tensor.datatype == "BYTES" or _FAMILY[given.dtype.kind] != _FAMILY[spec.dtype.kind]:
        raise InvalidInput(f"{where} has datatype {tensor.datatype}; the model takes {expected}")
    return given


def _payload(request_tensors: list, loaded) -> dict:
    specs = {t.name: t for t in loaded.adapter.input_tensors()}
    payload = {}
    for tensor in request_tensors:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"unknown input {tensor.name!r}; model {loaded.name!r} takes {sorted(specs)}")
        payload[tensor.name] = _value(tensor, spec)
    return payload


def blueprint(pipeline: Pipeline) -> Blueprint:
    """The /v2 routes on `pipeline`."""
    bp = Blueprint("v2", __name__, url_prefix=PREFIX)
    manager = pipeline.manager

    @bp.get("")
    def server_metadata():
        return jsonify(name="binserve", version=VERSION, extensions=["binary_tensor_data"])

    @bp.get("/health/live")
    def live():
        return Response(status=200)

    @bp.get("/health/ready")
    def ready():
        if manager.draining or not manager.ready:
            raise NotReady("the server is not ready (GET /readyz says why)", retry_after_s=1.0)
        return Response(status=200)

    @bp.get("/models/<model:model>", defaults={"version": None})
    @bp.get("/models/<model:model>/versions/<version>")
    def metadata(model: str, version: str | None):
        return jsonify(model_metadata(pipeline.model(model, version)))

    @bp.get("/models/<model:model>/ready", defaults={"version": None})
    @bp.get("/models/<model:model>/versions/<version>/ready")
    def model_ready(model: str, version: str | None):
        pipeline.model(model, version)  # 404 unknown, 503 loading
        return Response(status=200)

    @bp.post("/models/<model:model>/infer", defaults={"version": None})
    @bp.post("/models/<model:model>/versions/<version>/infer")
    @inference_view("v2")
    def infer(model: str, version: str | None):
        pipeline.admit("v2")
        loaded = pipeline.model(model, version)
        if loaded.adapter.generates:  # outputs of different lengths per prompt: not a V2 tensor
            raise BadRequest(
                f"model {model!r} generates text: use /v1/completions, /v1/chat/completions or /infer/{model}"
            )
        header_length = request.headers.get("Inference-Header-Content-Length")
        max_strings = pipeline.config.max_queue_samples
        parsed = v2_tensors.parse_request(pipeline.body(), header_length, pipeline.limits, max_strings)
        deadline = pipeline.deadline(v2_tensors.check_timeout_us(parsed.timeout_us), "parameters.timeout")
        produced = list(loaded.signature)
        wanted = parsed.outputs or [v2_tensors.Requested(n, parsed.binary_outputs) for n in produced]
        unknown = [o.name for o in wanted if o.name not in produced]
        if unknown:  # before the batch: a request that cannot be answered costs no forward pass
            raise BadRequest(f"unknown outputs {unknown}; model {loaded.name!r} produces {produced}")
        outcome = pipeline.infer(loaded, _payload(parsed.inputs, loaded), deadline, version)
        encode_start = time.monotonic()
        binary = [parsed.binary_outputs if o.binary is None else o.binary for o in wanted]
        chosen = [(o.name, outcome.reply[o.name], b) for o, b in zip(wanted, binary, strict=True)]
        body, headers = v2_tensors.encode_response(loaded.name, str(outcome.result.tag), parsed.id, chosen)
        headers.update(outcome.headers(time.monotonic() - encode_start))
        return Response(body, headers=headers)

    return bp

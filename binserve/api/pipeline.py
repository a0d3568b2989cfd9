"""The request pipeline every protocol shares: read, authorize, validate, submit, wait, time.

design: a blueprint translates its wire shape into an adapter payload, hands it to
`Pipeline.infer`, and translates the adapter's reply back; limits, deadlines, the batcher,
`Server-Timing` and the request metrics are the same whichever protocol a request came in by, so a
V2 or OpenAI request is batched with native requests for the same model. `install_hooks` adds the
per-request bookkeeping (request id, socket timeout, in-flight and request metrics) for views marked
with `inference_view`.
"""

from __future__ import annotations

import hmac
import select
import socket
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, request

from binary_protocol import Limits, decode_body, json_to_dict
from binserve.config import ServerConfig
from binserve.errors import (
    BadRequest,
    DeadlineExceeded,
    Forbidden,
    LimitExceeded,
    ModelNotFound,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
)
from binserve.observability import metrics
from binserve.policy.cache import request_key
from binserve.policy.gate import Admission, Policy
from binserve.process import stamps
from binserve.process.memory import trim_heap
from binserve.scheduling.contract import BatchResult
from binserve.serving.contract import ModelHost, ServedModel
from binserve.wire.media import is_json, media_type
from models.contract import Validated

# How long a request thread waits past its deadline for a batch that already started.
_DEADLINE_GRACE_S = 5.0
# After a request this large, glibc is asked to hand freed pages back (a few ms, off the reply path).
_TRIM_AFTER_BYTES = 4 * 1024 * 1024
# The longest deadline a caller may ask for.
_MAX_TIMEOUT_MS = 3_600_000


def inference_view(protocol: str):
    """Mark a view as an inference request of `protocol`: counted in the request metrics, open to
    the CORS origins."""

    def mark(view):
        view.binserve_protocol = protocol
        view.binserve_cors = True
        return view

    return mark


def cors_view(view):
    """Mark a read-only view that pages of the CORS origins may call (model listings)."""
    view.binserve_cors = True
    return view


def _view_marks() -> tuple[str | None, bool]:
    """The request's view's protocol (None: not an inference route) and whether CORS applies."""
    view = current_app.view_functions.get(request.endpoint or "")
    return getattr(view, "binserve_protocol", None), getattr(view, "binserve_cors", False)


def no_cache_requested() -> tuple[bool, bool]:
    """(do not read the cache, do not write it) from the request's `Cache-Control`."""
    directives = {d.strip().split("=")[0].lower() for d in request.headers.get("Cache-Control", "").split(",")}
    return ("no-cache" in directives or "no-store" in directives), "no-store" in directives


def read_body(config: ServerConfig) -> bytes:
    """The request body, read to at most its limit + 1 byte: 413 past it, whatever the framing.

    A declared length is checked before anything is read; a chunked body (no length) is cut at
    limit + 1 bytes, which proves it too large. JSON has its own, smaller limit.
    """
    json_body = is_json(request.content_type)
    limit = config.max_json_bytes if json_body else config.max_body_bytes
    what = "JSON body" if json_body else "body"
    declared = request.content_length
    if declared is not None and declared > limit:
        raise LimitExceeded(f"{what} of {declared} bytes is over the {limit}-byte limit")
    stream = request.environ["wsgi.input"]
    try:
        body = stream.read(limit + 1) if declared is None else stream.read(declared)
    except OSError:  # the socket timed out (client_timeout_s) or broke mid-body
        raise RequestTimeout(f"the body did not arrive within client_timeout_s={config.client_timeout_s}") from None
    if len(body) > limit:
        raise LimitExceeded(f"{what} is over the {limit}-byte limit")
    if declared is not None and len(body) < declared:
        raise BadRequest(f"the body ended after {len(body)} of its {declared} declared bytes")
    return body


def check_token(expected: str) -> None:
    """Bearer-token check in constant time; 401 without a token, 403 with a wrong one."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Forbidden("the bearer token is not valid")


def client_gone_check(environ: dict):
    """A check that the client hung up, from the socket Gunicorn puts in the environ (None if absent)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # readable with no data to peek at means EOF: the client closed its side
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


def _request_id() -> str:
    """The caller's X-Request-Id when it is a sane token, else a new one (it goes into logs)."""
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def arrival_timing() -> str:
    """`Server-Timing`'s stages before the app: `wait` (the request, whole in the worker's event loop,
    until a request thread took it) and `parse` (Gunicorn's parser and the WSGI call, until the app's
    first hook); empty outside binserve's worker."""
    stamped = stamps.since_arrival()
    if stamped is None:
        return ""
    arrived, dispatched = stamped
    return f"wait;dur={(dispatched - arrived) * 1000:.2f}, parse;dur={(g.started - dispatched) * 1000:.2f}, "


@dataclass
class Outcome:
    """What a request's batch gave back: the adapter's reply and how the time was spent."""

    loaded: ServedModel
    validated: Validated
    reply: dict
    result: BatchResult
    started: float
    decoded: float

    def headers(self, encode_s: float) -> dict[str, str]:
        """The metadata headers every protocol sends with a reply."""
        timing = (
            f"{arrival_timing()}decode;dur={(self.decoded - self.started) * 1000:.2f}, "
            f"queue;dur={self.result.queue_s * 1000:.2f}, infer;dur={self.result.infer_s * 1000:.2f}, "
            f"encode;dur={encode_s * 1000:.2f}"
        )
        return {
            "X-Request-Id": g.request_id,
            "X-Model-Version": str(self.result.tag),
            "X-Model": self.loaded.name,
            "X-Batch-Size": str(self.result.batch_size),
            "Server-Timing": timing,
        }


class Pipeline:
    """The shared steps of an inference request, for one app's config and model manager."""

    def __init__(self, config: ServerConfig, manager: ModelHost, policy: Policy | None = None) -> None:
        self.config = config
        self.manager = manager
        self.policy = policy if policy is not None else Policy.from_config(config)
        self.limits = Limits(
            max_body_bytes=config.max_body_bytes,
            max_json_bytes=config.max_json_bytes,
            max_decoded_bytes=config.max_decoded_bytes,
        )

    def authorize(self, family: str) -> None:
        """The caller's API key, when the server has keys: 401 without one, 403 when it may not use
        this `family` of routes (native, v2, openai, generate)."""
        self.policy.identify(g.admission, request.headers.get("Authorization", ""), family)

    def admit(self, family: str) -> None:
        """`authorize`, then one request of the key's quota (429 when spent), before anything is decoded."""
        self.authorize(family)
        self.policy.admit_request(g.admission)

    def admit_tokens(self, tokens: int) -> None:
        """The key's token quota for input whose size is now known (429 when over)."""
        self.policy.admit_tokens(g.admission, tokens)

    def charger(self):
        """A function that charges tokens produced later (generation) to this request's key; it
        holds the request's admission, so a streamed reply can call it after the view returned."""
        admission, policy = g.admission, self.policy
        return lambda tokens: policy.charge(admission, tokens)

    def body(self) -> bytes:
        """The request body within its limit (see `read_body`)."""
        return read_body(self.config)

    def json_object(self) -> dict:
        """A JSON-only route's body (no Content-Type is taken as JSON; any other is 415)."""
        if request.content_type and not is_json(request.content_type):
            raise UnsupportedMediaType(f"send application/json, not {media_type(request.content_type)!r}")
        return json_to_dict(self.body(), self.limits)

    def decode(self) -> tuple[dict, str]:
        """The body decoded by the native protocol's rules: (payload, format)."""
        return decode_body(self.body(), request.content_type, self.limits)

    def deadline(self, timeout_ms: float | None = None, what: str = "X-Request-Timeout-Ms") -> float:
        """The request's deadline: `timeout_ms` (a protocol's own field), else the header, else the default."""
        raw = request.headers.get("X-Request-Timeout-Ms") if timeout_ms is None else timeout_ms
        if raw is None:
            return g.started + self.config.request_timeout_s
        try:
            ms = float(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{what} must be a number of milliseconds, got {raw!r}") from None
        if not 0 < ms <= _MAX_TIMEOUT_MS:
            raise BadRequest(f"{what} must be in (0, {_MAX_TIMEOUT_MS}] milliseconds, got {raw!r}")
        return g.started + ms / 1000.0

    def model(self, name: str | None, version: str | None = None) -> ServedModel:
        """The served model `name` (None: the default); 404 when `version` is given and not the one served."""
        self.policy.check_model(g.admission, name if name is not None else self.manager.default_name)
        loaded = self.manager.get(name)
        g.model_label = loaded.name
        if version is not None and version != loaded.adapter.version:
            raise ModelNotFound(self._version_message(loaded, version))
        return loaded

    def _version_message(self, loaded: ServedModel, version: str) -> str:
        served = loaded.adapter.version
        try:
            known = version in self.manager.repo.versions(loaded.name)
        except OSError:
            known = False
        where = "is in the repository but not served" if known else "does not exist"
        return f"version {version!r} of model {loaded.name!r} {where}; this server serves version {served!r}"

    def submit(self, loaded: ServedModel, validated: Validated, deadline: float) -> Future:
        """Queue a validated request on the model's batcher (429 when full, 413 when it never fits)."""
        return loaded.scheduler.submit(validated.samples, deadline, client_gone_check(request.environ))

    def wait(self, loaded: ServedModel, future: Future, deadline: float) -> BatchResult:
        """The batch's result, or 504 once the deadline (plus a grace for a batch under way) passed."""
        try:
            result = future.result(timeout=max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S)
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded("the request's deadline passed while its batch was still running") from None
        metrics.QUEUE_DURATION.labels(loaded.name).observe(result.queue_s)
        return result

    def infer(self, loaded: ServedModel, payload: dict, deadline: float, version: str | None = None) -> Outcome:
        """Validate `payload` for the model, charge its tokens, answer it from the response cache or
        run it in a batch and wait; the adapter's reply."""
        adapter = loaded.adapter
        validated = adapter.validate(payload)
        self.admit_tokens(input_tokens(adapter, validated))
        decoded = time.monotonic()
        key = self._cache_key(loaded, adapter, validated)
        skip_read, skip_write = no_cache_requested()
        if key is not None:
            cached = None if skip_read else self.policy.cache.get(key)
            metrics.CACHE_REQUESTS.labels(
                loaded.name, "bypass" if skip_read else ("hit" if cached is not None else "miss")
            ).inc()
            g.cache_result = "hit" if cached is not None else "miss"
            if cached is not None:  # answered without a batch: batch size 0, no queue, no inference
                result = BatchResult([], 0, 0.0, 0.0, adapter.version)
                return Outcome(loaded, validated, cached, result, g.started, decoded)
        result = self.wait(loaded, self.submit(loaded, validated, deadline), deadline)
        if version is not None and str(result.tag) != version:  # a reload landed while it waited
            raise ModelNotFound(self._version_message(loaded, version))
        reply = adapter.join(result.outputs, validated.batched, validated.options)
        if key is not None and not skip_write and str(result.tag) == adapter.version:
            # stored only under the version it was looked up for: a batch that ran on a version
            # reloaded meanwhile leaves no entry behind that either version could be answered from
            self.policy.cache.put(key, loaded.name, reply)
        return Outcome(loaded, validated, reply, result, g.started, decoded)

    def _cache_key(self, loaded: ServedModel, adapter, validated: Validated) -> bytes | None:
        if not (self.policy.cache.enabled and loaded.cacheable):
            return None
        variant = "batched" if validated.batched else "single"
        return request_key(loaded.name, adapter.version, validated.samples, validated.options, variant)


def input_tokens(adapter, validated: Validated) -> int:
    """The tokens a validated request puts into the model (0 for array models)."""
    if not adapter.token_inputs:
        return 0
    return sum(len(s) for s in validated.samples)


def install_hooks(app: Flask, config: ServerConfig, policy: Policy) -> None:
    """Per-request bookkeeping: request ids, socket timeouts, heap trims, the request metrics, and
    the policy's headers (rate limits, cache, CORS) and per-key counts."""

    @app.before_request
    def _count_in():
        g.request_id = _request_id()
        g.admission = Admission()
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            # Whatever of the body the worker did not buffer, and the reply, must not wait on a stalled client.
            sock.settimeout(config.client_timeout_s)
        g.started = time.monotonic()
        protocol, cors = _view_marks()
        if request.method == "OPTIONS":
            return _preflight(policy, cors)
        if protocol is not None:
            g.protocol = protocol
            metrics.IN_FLIGHT.inc()

    @app.after_request
    def _count_out(response: Response) -> Response:
        response.headers.setdefault("X-Request-Id", g.get("request_id", ""))
        _policy_headers(policy, response)
        if response.status_code == 413:
            response.headers["Connection"] = "close"  # do not read the rest of a body we refused
        if (request.content_length or 0) >= _TRIM_AFTER_BYTES or response.status_code == 413:
            response.call_on_close(trim_heap)  # after the reply is sent
        protocol = g.get("protocol")
        if protocol is not None:
            # Only served names become labels: a URL naming anything else must not grow the series.
            label = g.get("model_label", metrics.UNKNOWN_MODEL)
            elapsed = time.monotonic() - g.started
            for model in g.get("fanout_models") or [label]:  # a fan-out is answered by each of its models
                metrics.REQUESTS.labels(model, str(response.status_code), protocol).inc()
                metrics.REQUEST_DURATION.labels(model).observe(elapsed)
            metrics.REQUEST_BYTES.labels(label).inc(request.content_length or 0)
            if not response.is_streamed:
                metrics.RESPONSE_BYTES.labels(label).inc(response.calculate_content_length() or 0)
            # refusals at the HTTP layer; the batcher counts overloaded, deadline and client_gone
            reason = "protocol" if g.get("protocol_error") else metrics.REASON_BY_STATUS.get(response.status_code)
            if reason:
                metrics.REJECTED.labels(label, reason).inc()
        return response

    @app.teardown_request
    def _in_flight_done(exc):
        if g.get("protocol") is not None:
            metrics.IN_FLIGHT.dec()


def _preflight(policy: Policy, cors: bool) -> Response | None:
    """A CORS preflight of an inference route: 204 with what the route allows, 403 for an origin
    not on the list; None (Flask's own OPTIONS reply, no CORS headers) for any other route."""
    if not (cors and policy.cors.enabled and request.headers.get("Access-Control-Request-Method")):
        return None
    origin = request.headers.get("Origin")
    methods = ", ".join(sorted(m for m in request.url_rule.methods if m not in ("HEAD", "OPTIONS")))
    headers = policy.cors.preflight(origin, methods)
    if headers is None:
        return Response(f"origin {origin!r} may not call this server\n", status=403, mimetype="text/plain")
    return Response(status=204, headers=headers)


def _policy_headers(policy: Policy, response: Response) -> None:
    admission = g.get("admission")
    if admission is None:
        return
    if g.get("protocol") is not None or admission.key is not None:
        admission.count()
    response.headers.update(admission.headers())
    cached = g.get("cache_result")
    if cached is not None:
        response.headers["X-Cache"] = cached
    _, cors = _view_marks()
    if cors and policy.cors.enabled and request.method != "OPTIONS":
        response.headers.update(policy.cors.headers(request.headers.get("Origin")))

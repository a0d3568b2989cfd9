"""Per-request bookkeeping around every route: request ids, socket timeouts, heap trims, the request
metrics, and the policy layer's headers (rate limits, `X-Cache`, CORS, preflight) and per-key counts.

design: a view is marked with `inference_view(protocol)` (an inference request: counted in the
request metrics, open to the CORS origins) or `cors_view` (a listing pages may read); the hooks
read the marks, so the blueprints carry no bookkeeping of their own.
"""

from __future__ import annotations

import time
import uuid

from flask import Flask, Response, current_app, g, request

from binserve.api.context import RequestContext, maybe_context
from binserve.config import ServerConfig
from binserve.observability import metrics
from binserve.policy.gate import Policy
from binserve.process.memory import trim_heap

# After a request this large, glibc is asked to hand freed pages back (a few ms, off the reply path).
_TRIM_AFTER_BYTES = 4 * 1024 * 1024


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


def _request_id(environ: dict) -> str:
    """The caller's X-Request-Id when it is a sane token, else a new one (it goes into logs)."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def install_hooks(app: Flask, config: ServerConfig, policy: Policy) -> None:
    """Per-request bookkeeping: the request's context, socket timeouts, heap trims, the request
    metrics, and the policy's headers (rate limits, cache, CORS) and per-key counts."""
    series = metrics.RequestSeries()

    @app.before_request
    def _count_in():
        environ = request.environ
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            # Whatever of the body the worker did not buffer, and the reply, must not wait on a stalled client.
            sock.settimeout(config.client_timeout_s)
        protocol, cors = _view_marks()
        ctx = g.ctx = RequestContext(_request_id(environ), time.monotonic(), family=protocol, cors=cors)
        if request.method == "OPTIONS":
            ctx.family = None  # a preflight is not an inference request
            return _preflight(policy, cors)
        if protocol is not None:
            series.in_flight.inc()

    @app.after_request
    def _count_out(response: Response) -> Response:
        ctx = maybe_context()
        status = response.status_code
        if status == 413:
            response.headers["Connection"] = "close"  # do not read the rest of a body we refused
        received = request.content_length or 0
        if received >= _TRIM_AFTER_BYTES or status == 413:
            response.call_on_close(trim_heap)  # after the reply is sent
        if ctx is None:  # the request failed before the first hook
            return response
        response.headers.setdefault("X-Request-Id", ctx.request_id)
        _policy_headers(policy, response, ctx)
        if ctx.family is not None:
            # Only served names become labels: a URL naming anything else must not grow the series.
            sent = None if response.is_streamed else (response.calculate_content_length() or 0)
            # refusals at the HTTP layer; the batcher counts overloaded, deadline and client_gone
            reason = "protocol" if ctx.protocol_error else metrics.REASON_BY_STATUS.get(status)
            series.answered(ctx.labels, ctx.model, ctx.family, status, time.monotonic() - ctx.started,
                            received, sent, reason)  # fmt: skip
        return response

    @app.teardown_request
    def _in_flight_done(exc):
        ctx = maybe_context()
        if ctx is not None and ctx.family is not None:
            series.in_flight.dec()


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


def _policy_headers(policy: Policy, response: Response, ctx: RequestContext) -> None:
    admission = ctx.admission
    if ctx.family is not None or admission.key is not None:
        policy.count(admission)
    extra = admission.headers()
    if "Retry-After" in extra:
        response.headers.update(extra)  # replaces the error handler's rounded Retry-After
    elif extra:
        response.headers.extend(extra.items())  # new names: no scan for ones to replace
    if ctx.cache is not None:
        response.headers["X-Cache"] = ctx.cache
    if policy.cors.enabled and ctx.cors and request.method != "OPTIONS":
        response.headers.update(policy.cors.headers(request.headers.get("Origin")))

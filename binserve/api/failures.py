"""One error mapping for every protocol: each failure becomes a status, a type and a message.

design: route code raises `errors.ServingError` subclasses (they carry their HTTP status); Flask's
own HTTP errors and anything unexpected are mapped here too, the unexpected ones to a 500 that
names a request id and never internals. Only the body's shape depends on the protocol: the native
`{"error": {"type", "message"}}`, V2's `{"error": "<message>"}`, OpenAI's
`{"error": {"message", "type", "param", "code"}}` - chosen by the URL prefix a protocol registers,
so even a 404 for an unknown /v2 route answers in V2's shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from binserve.api.context import maybe_context
from binserve.errors import PayloadTooLarge, ProtocolError, ServingError

log = logging.getLogger("binserve.server")


@dataclass(frozen=True)
class Failure:
    """An error as every protocol sees it."""

    status: int
    type: str
    message: str
    retry_after_s: float | None = None


def native_body(failure: Failure) -> dict:
    """binserve's own error body (also what request_tools maps back to typed exceptions)."""
    return {"error": {"type": failure.type, "message": failure.message}}


def failure_of(err: Exception) -> Failure:
    """The status, type and message for any exception a request raised."""
    if isinstance(err, ServingError):
        return Failure(err.status_code, err.error_type, err.message, err.retry_after_s)
    if isinstance(err, HTTPException):
        kind = "payload_too_large" if err.code == 413 else (err.name or "http_error").lower().replace(" ", "_")
        return Failure(err.code or 500, kind, err.description or err.name)
    # The details go to the log, under the request id; the caller gets the id, not the internals.
    rid = _request_id()
    log.error("unhandled error on %s (request id %s)", request.path, rid, exc_info=err)
    return Failure(500, "internal_error", f"internal error; the server log has the details under request id {rid}")


def _request_id() -> str:
    ctx = maybe_context()
    return ctx.request_id if ctx is not None else ""


def install(app: Flask, bodies: dict[str, Callable[[Failure], dict]]) -> None:
    """Handle every error of `app`; `bodies` maps a URL prefix to its protocol's error body."""
    prefixes = sorted(bodies, key=len, reverse=True)

    def respond(err: Exception):
        failure = failure_of(err)
        ctx = maybe_context()
        if ctx is not None and isinstance(err, ProtocolError) and not isinstance(err, PayloadTooLarge):
            ctx.protocol_error = True
        if isinstance(err, ServingError) and failure.status >= 500:
            log.warning("request id %s: %s %s", _request_id(), failure.status, failure.message)
        path = request.path
        shape = next((bodies[p] for p in prefixes if path == p or path.startswith(p + "/")), native_body)
        resp = jsonify(shape(failure))
        resp.status_code = failure.status
        if failure.retry_after_s is not None:
            resp.headers["Retry-After"] = str(max(1, round(failure.retry_after_s)))
        return resp

    app.register_error_handler(Exception, respond)

"""The binserve HTTP layer: routes that decode, validate, submit, wait and encode - nothing else.

design: like LitServe's handler, a request thread decodes the body (`binary_protocol`), lets the
model's adapter validate it into samples, puts them on the model's batcher and waits on its
future; batching and models live elsewhere and never import Flask. Every failure is a
`ServingError` carrying its status, turned into `{"error": {...}}` by one handler.

`gunicorn -c gunicorn.conf.py server:app` serves the module-level `app` (created on first access,
inside each worker, so models and CUDA are never initialised in the Gunicorn master);
`python server.py --port 8000 ...` starts exactly that with the flags passed on as env vars.
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import sys
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound

import metrics
from binary_protocol import Limits, decode_body, encode_body, reply_format
from config import ServerConfig
from errors import (
    BadRequest,
    DeadlineExceeded,
    Forbidden,
    LimitExceeded,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    ServingError,
    Unauthorized,
)
from model_manager import ModelManager
from runtime import configure_threads, select_device, trim_heap

log = logging.getLogger("binserve.server")

# How long a request thread waits past its deadline for a batch that already started.
_DEADLINE_GRACE_S = 5.0
# Served only on config.admin_port when one is set.
_ADMIN_ENDPOINTS = frozenset({"update_model", "metrics_endpoint"})
# After a request this large, glibc is asked to hand freed pages back (a few ms, off the reply path).
_TRIM_AFTER_BYTES = 4 * 1024 * 1024


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def read_body(config: ServerConfig) -> bytes:
    """The request body, read to at most its limit + 1 byte: 413 past it, whatever the framing.

    A declared length is checked before anything is read; a chunked body (no length) is cut at
    limit + 1 bytes, which proves it too large. JSON has its own, smaller limit.
    """
    is_json = _media(request.content_type) in ("application/json",) or _media(request.content_type).endswith("+json")
    limit = config.max_json_bytes if is_json else config.max_body_bytes
    what = "JSON body" if is_json else "body"
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


def _check_token(expected: str) -> None:
    """Bearer-token check in constant time; 401 without a token, 403 with a wrong one."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Forbidden("the bearer token is not valid")


def _client_gone_check(environ: dict):
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


def _deadline(start: float, config: ServerConfig) -> float:
    raw = request.headers.get("X-Request-Timeout-Ms")
    if raw is None:
        return start + config.request_timeout_s
    try:
        ms = float(raw)
    except ValueError:
        raise BadRequest(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw!r}") from None
    if not 0 < ms <= 3_600_000:
        raise BadRequest(f"X-Request-Timeout-Ms must be in (0, 3600000], got {raw!r}")
    return start + ms / 1000.0


def create_app(config: ServerConfig | None = None, *, manager: ModelManager | None = None) -> Flask:
    """Build the Flask app for `config` (default: from BINSERVE_* env); models load in the background."""
    config = config or ServerConfig.from_env()
    if manager is None:
        worker_index = int(os.environ.get("BINSERVE_WORKER_INDEX", "0"))
        configure_threads(config, worker_index)
        device = select_device(config, worker_index)
        manager = ModelManager(config, device).start(background=True)
    app = Flask("binserve")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["binserve"] = manager
    limits = Limits(
        max_body_bytes=config.max_body_bytes,
        max_json_bytes=config.max_json_bytes,
        max_decoded_bytes=config.max_decoded_bytes,
    )

    @app.post("/infer", defaults={"model": None})
    @app.post("/infer/<model>")
    def infer(model: str | None):
        start = g.started  # set by _count_in, so metrics and Server-Timing share one clock
        if config.auth_token:
            _check_token(config.auth_token)
        deadline = _deadline(start, config)
        loaded = manager.get(model)
        g.model_label = loaded.name
        payload, fmt = decode_body(read_body(config), request.content_type, limits)
        validated = loaded.adapter.validate(payload)
        decoded = time.monotonic()
        future = loaded.batcher.submit(validated.samples, deadline, _client_gone_check(request.environ))
        try:
            result = future.result(timeout=max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S)
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded("the request's deadline passed while its batch was still running") from None
        metrics.QUEUE_DURATION.labels(loaded.name).observe(result.queue_s)
        reply = loaded.adapter.join(result.outputs, validated.batched)
        encode_start = time.monotonic()
        body, content_type = encode_body(reply, reply_format(fmt, request.headers.get("Accept")))
        timing = (
            f"decode;dur={(decoded - start) * 1000:.2f}, queue;dur={result.queue_s * 1000:.2f}, "
            f"infer;dur={result.infer_s * 1000:.2f}, encode;dur={(time.monotonic() - encode_start) * 1000:.2f}"
        )
        return Response(
            body,
            content_type=content_type,
            headers={
                "X-Request-Id": g.request_id,
                "X-Model-Version": str(result.tag),
                "X-Model": loaded.name,
                "X-Batch-Size": str(result.batch_size),
                "Server-Timing": timing,
            },
        )

    @app.before_request
    def _count_in():
        g.request_id = _request_id()
        if config.admin_port and request.endpoint in _ADMIN_ENDPOINTS:
            # With an admin port, the admin surface is not reachable through the inference port (and
            # so not through the Service that exposes only that port).
            if request.environ.get("SERVER_PORT") != str(config.admin_port):
                raise NotFound()
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            # Whatever of the body the worker did not buffer, and the reply, must not wait on a stalled client.
            sock.settimeout(config.client_timeout_s)
        if request.endpoint == "infer":
            g.started = time.monotonic()
            metrics.IN_FLIGHT.inc()

    @app.after_request
    def _count_out(response: Response) -> Response:
        response.headers.setdefault("X-Request-Id", g.get("request_id", ""))
        if response.status_code == 413:
            response.headers["Connection"] = "close"  # do not read the rest of a body we refused
        if (request.content_length or 0) >= _TRIM_AFTER_BYTES or response.status_code == 413:
            response.call_on_close(trim_heap)  # after the reply is sent
        if request.endpoint == "infer" and "started" in g:
            # Only served names become labels: a URL naming anything else must not grow the series.
            label = g.get("model_label", metrics.UNKNOWN_MODEL)
            metrics.REQUESTS.labels(label, str(response.status_code)).inc()
            metrics.REQUEST_DURATION.labels(label).observe(time.monotonic() - g.started)
            metrics.REQUEST_BYTES.labels(label).inc(request.content_length or 0)
            metrics.RESPONSE_BYTES.labels(label).inc(response.calculate_content_length() or 0)
            # refusals at the HTTP layer; the batcher counts overloaded, deadline and client_gone
            reason = "protocol" if g.get("protocol_error") else metrics.REASON_BY_STATUS.get(response.status_code)
            if reason:
                metrics.REJECTED.labels(label, reason).inc()
        return response

    @app.teardown_request
    def _in_flight_done(exc):
        if request.endpoint == "infer" and "started" in g:
            metrics.IN_FLIGHT.dec()

    @app.get("/metrics")
    def metrics_endpoint():
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.post("/update_model")
    def update_model():
        if not config.admin_token:
            raise Forbidden(
                "/update_model is disabled: start the server with BINSERVE_ADMIN_TOKEN=<secret> "
                "(or --admin-token) and send it as 'Authorization: Bearer <secret>'"
            )
        _check_token(config.admin_token)
        payload, _ = decode_body(read_body(config), request.content_type, limits)
        name = payload.get("model") or manager.default_name
        version, path = payload.get("version"), payload.get("path")
        if (version is None) == (path is None):
            raise BadRequest("send exactly one of 'version' (in the repository) or 'path' (a directory to import)")
        for key in ("model", "version", "path", "adapter"):
            if payload.get(key) is not None and not isinstance(payload[key], str):
                raise BadRequest(f"{key!r} must be a string")
        timeout_s = payload.get("timeout_s", config.reload_timeout_s)
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 3600:
            raise BadRequest("'timeout_s' must be a number of seconds in (0, 3600]")
        result = manager.update(name, version=version, path=path, adapter=payload.get("adapter"), timeout_s=timeout_s)
        if result["converged"]:
            return jsonify(result)
        lagging = sorted(w for w, v in result["workers"].items() if v != result["version"])
        body = {
            "error": {
                "type": "reload_incomplete",
                "message": f"workers {lagging} do not serve version {result['version']} after {timeout_s}s",
            },
            **result,
        }
        return jsonify(body), 504

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", pid=os.getpid())

    @app.get("/readyz")
    def readyz():
        if manager.draining:
            return jsonify(status="draining", pid=os.getpid()), 503
        if manager.ready:
            return jsonify(status="ready", pid=os.getpid())
        reasons = manager.not_ready_reasons()
        if reasons:  # the worker keeps retrying; /healthz stays 200 (a restart would not fix the repository)
            status = "failed: " + "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
            return jsonify(status=status, models=reasons, pid=os.getpid()), 503
        return jsonify(status="loading", pid=os.getpid()), 503

    @app.get("/models")
    def models():
        return jsonify(default=manager.default_name, ready=manager.ready, models=manager.describe())

    @app.errorhandler(ServingError)
    def serving_error(err: ServingError):
        if isinstance(err, ProtocolError) and not isinstance(err, PayloadTooLarge):
            g.protocol_error = True
        if err.status_code >= 500:
            log.warning("request id %s: %s %s", g.get("request_id", ""), err.status_code, err.message)
        resp = jsonify(err.to_dict())
        resp.status_code = err.status_code
        if err.retry_after_s is not None:
            resp.headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
        return resp

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        kind = "payload_too_large" if err.code == 413 else (err.name or "http_error").lower().replace(" ", "_")
        resp = jsonify({"error": {"type": kind, "message": err.description}})
        resp.status_code = err.code or 500
        return resp

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        # The details go to the log, under the request id; the caller gets the id, not the internals.
        rid = g.get("request_id", "")
        log.exception("unhandled error on %s (request id %s)", request.path, rid)
        message = f"internal error; the server log has the details under request id {rid}"
        resp = jsonify({"error": {"type": "internal_error", "message": message}})
        resp.status_code = 500
        return resp

    return app


def __getattr__(name: str):
    # `gunicorn server:app` reads this attribute inside each worker (preload_app is off), so the
    # models load after the fork; importing server.py for create_app loads nothing.
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    """`python server.py [--flags]`: run Gunicorn with gunicorn.conf.py and this config."""
    config = ServerConfig.from_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, **config.to_env()}
    print(
        f"binserve: starting {config.worker_count()} Gunicorn worker(s) on http://{config.host}:{config.port} "
        f"(models: {config.models or 'minilm (default)'}); ready when GET /readyz answers 200",
        flush=True,
    )
    os.chdir(here)
    os.execvpe(sys.executable, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "server:app"], env)


if __name__ == "__main__":
    main()

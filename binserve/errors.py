"""The error hierarchy of binserve, shared by the server and the client.

design: every error a request can meet is a `ServingError` subclass that carries its HTTP status
(`status_code`) and a stable machine-readable `error_type`. The server's single error handler turns
one into `{"error": {"type": ..., "message": ...}}` with that status; the client
(`request_tools`) turns the reply back into the same class with `error_from_reply`, so callers catch
`errors.Overloaded` on both sides of the wire. This module imports nothing outside the standard
library so that clients can ship it alone.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error binserve reports to a caller; `status_code` is the HTTP status."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: seconds the caller should wait before retrying (429, 503); None when not applicable.
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict:
        """The JSON error body: `{"error": {"type": ..., "message": ...}}`."""
        return {"error": {"type": self.error_type, "message": self.message}}


class BadRequest(ServingError):
    """The request is malformed or does not match the model's input spec (400)."""

    status_code = 400
    error_type = "bad_request"


class Conflict(ServingError):
    """The request lost to a concurrent one: e.g. a reload superseded by a later reload (409)."""

    status_code = 409
    error_type = "superseded"


class PayloadTooLarge(ServingError):
    """The body is over the configured size limit (413)."""

    status_code = 413
    error_type = "payload_too_large"


class ProtocolError(BadRequest, ValueError):
    """The body could not be decoded safely: refused opcode or global, bad length, limit exceeded."""

    error_type = "protocol_error"


class LimitExceeded(PayloadTooLarge, ProtocolError):
    """The body is, or decodes into, more than a limit allows: bytes, items, opcodes, the decode
    budget, samples or characters (413). Still a `ProtocolError`, so decoders' callers catch one class."""

    error_type = "payload_too_large"


class InvalidInput(BadRequest):
    """The body decoded but its keys, dtypes or shapes do not fit the model (400)."""

    error_type = "invalid_input"


class ModelLoadFailed(BadRequest):
    """/update_model: the requested version failed to load or failed its check (400)."""

    error_type = "model_load_failed"


class Unauthorized(ServingError):
    """No bearer token, or a malformed Authorization header (401)."""

    status_code = 401
    error_type = "unauthorized"


class Forbidden(ServingError):
    """The token is wrong, or the endpoint is disabled by configuration (403)."""

    status_code = 403
    error_type = "forbidden"


class RequestTimeout(ServingError):
    """The client stalled while sending its request, past client_timeout_s (408)."""

    status_code = 408
    error_type = "request_timeout"


class ModelNotFound(ServingError):
    """The URL names a model that is not loaded (404)."""

    status_code = 404
    error_type = "model_not_found"


class UnsupportedMediaType(ServingError):
    """The Content-Type (or Accept) names a format binserve does not speak (415)."""

    status_code = 415
    error_type = "unsupported_media_type"


class Overloaded(ServingError):
    """The model's queue is full; retry after `retry_after_s` (429)."""

    status_code = 429
    error_type = "overloaded"


class RateLimited(Overloaded):
    """The API key's quota is spent for now; retry after `retry_after_s` (429). An `Overloaded`, so
    callers that back off on a full queue back off here too."""

    error_type = "rate_limited"


class ClientGone(ServingError):
    """The client disconnected before its request ran; nobody reads this answer (nginx's 499)."""

    status_code = 499
    error_type = "client_closed_request"


class ModelFailure(ServingError):
    """The model raised while running a batch that held this request (500)."""

    status_code = 500
    error_type = "model_error"


class InsufficientStorage(ServingError):
    """/update_model: the model repository's volume is full (or over its quota) (507); nothing of
    the import is left behind and the serving version is untouched."""

    status_code = 507
    error_type = "insufficient_storage"


class NotReady(ServingError):
    """The server is starting, draining or has no model loaded yet (503)."""

    status_code = 503
    error_type = "not_ready"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before the model ran it (504)."""

    status_code = 504
    error_type = "deadline_exceeded"


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


# Where several classes share a type (LimitExceeded is a PayloadTooLarge), the most general one wins.
_BY_TYPE: dict[str, type[ServingError]] = {}
for _cls in sorted(_all_subclasses(ServingError), key=lambda c: len(c.__mro__)):
    _BY_TYPE.setdefault(_cls.error_type, _cls)
# When the type is unknown (an older or newer server), fall back to the most general class per status.
_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: ModelNotFound,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: Overloaded,
    500: ServingError,
    503: NotReady,
    504: DeadlineExceeded,
    507: InsufficientStorage,
}


def error_from_reply(
    status: int, error_type: str | None, message: str, retry_after_s: float | None = None
) -> ServingError:
    """Rebuild the typed error a server reported, from its status and `{"error": {...}}` body."""
    cls = _BY_TYPE.get(error_type or "")
    if cls is None or cls.status_code != status:
        cls = _BY_STATUS.get(status, ServingError)
    err = cls(message, retry_after_s=retry_after_s)
    if err.status_code != status:
        # An unexpected status (e.g. 502 from a proxy) keeps the real number for the caller.
        err.status_code = status
    return err

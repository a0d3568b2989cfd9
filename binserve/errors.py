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

    def __init_subclass__(cls, *, status: int | None = None, error_type: str | None = None, **kw) -> None:
        """`class Forbidden(ServingError, status=403, error_type="forbidden")`: a subclass names its
        HTTP status and stable type in its header; what it leaves out it inherits."""
        super().__init_subclass__(**kw)
        if status is not None:
            cls.status_code = status
        if error_type is not None:
            cls.error_type = error_type

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: seconds the caller should wait before retrying (429, 503); None when not applicable.
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict:
        """The JSON error body: `{"error": {"type": ..., "message": ...}}`."""
        return {"error": {"type": self.error_type, "message": self.message}}


class BadRequest(ServingError, status=400, error_type="bad_request"):
    """The request is malformed or does not match the model's input spec (400)."""


class Conflict(ServingError, status=409, error_type="superseded"):
    """The request lost to a concurrent one: e.g. a reload superseded by a later reload (409)."""


class PayloadTooLarge(ServingError, status=413, error_type="payload_too_large"):
    """The body is over the configured size limit (413)."""


class ProtocolError(BadRequest, ValueError, error_type="protocol_error"):
    """The body could not be decoded safely: refused opcode or global, bad length, limit exceeded."""


class LimitExceeded(PayloadTooLarge, ProtocolError, error_type="payload_too_large"):
    """The body is, or decodes into, more than a limit allows: bytes, items, opcodes, the decode
    budget, samples or characters (413). Still a `ProtocolError`, so decoders' callers catch one class."""


class InvalidInput(BadRequest, error_type="invalid_input"):
    """The body decoded but its keys, dtypes or shapes do not fit the model (400)."""


class ModelLoadFailed(BadRequest, error_type="model_load_failed"):
    """/update_model: the requested version failed to load or failed its check (400)."""


class Unauthorized(ServingError, status=401, error_type="unauthorized"):
    """No bearer token, or a malformed Authorization header (401)."""


class Forbidden(ServingError, status=403, error_type="forbidden"):
    """The token is wrong, or the endpoint is disabled by configuration (403)."""


class RequestTimeout(ServingError, status=408, error_type="request_timeout"):
    """The client stalled while sending its request, past client_timeout_s (408)."""


class ModelNotFound(ServingError, status=404, error_type="model_not_found"):
    """The URL names a model that is not loaded (404)."""


class UnsupportedMediaType(ServingError, status=415, error_type="unsupported_media_type"):
    """The Content-Type (or Accept) names a format binserve does not speak (415)."""


class Overloaded(ServingError, status=429, error_type="overloaded"):
    """The model's queue is full; retry after `retry_after_s` (429)."""


class RateLimited(Overloaded, error_type="rate_limited"):
    """The API key's quota is spent for now; retry after `retry_after_s` (429). An `Overloaded`, so
    callers that back off on a full queue back off here too."""


class ClientGone(ServingError, status=499, error_type="client_closed_request"):
    """The client disconnected before its request ran; nobody reads this answer (nginx's 499)."""


class ModelFailure(ServingError, status=500, error_type="model_error"):
    """The model raised while running a batch that held this request (500)."""


class InsufficientStorage(ServingError, status=507, error_type="insufficient_storage"):
    """/update_model: the model repository's volume is full (or over its quota) (507); nothing of
    the import is left behind and the serving version is untouched."""


class NotReady(ServingError, status=503, error_type="not_ready"):
    """The server is starting, draining or has no model loaded yet (503)."""


class DeadlineExceeded(ServingError, status=504, error_type="deadline_exceeded"):
    """The request's deadline passed before the model ran it (504)."""


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

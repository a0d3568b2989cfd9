"""One request's state from the edge to its reply, built once when the request arrives.

design: the before-request hook (`hooks.py`) makes a `RequestContext` and keeps it as `g.ctx`;
the pipeline, the error mapping and the after-request hook read and fill its fields instead of
loose `flask.g` attributes, so what a request carries is written down in one place and typed.
Nothing here imports Flask's request: a context is plain data (tests build one directly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import g

from binserve.observability.metrics import UNKNOWN_MODEL
from binserve.policy.gate import Admission


@dataclass(slots=True)
class RequestContext:
    """What the layers of one request share: who asked, through which route family, for which
    models, and when it arrived."""

    request_id: str
    #: time.monotonic() when the app first saw the request (its hooks' start)
    started: float
    #: the caller's key, its outcome and quota standing (the policy layer's)
    admission: Admission = field(default_factory=Admission)
    #: the protocol of an inference route (native, predict, v2, openai, generate, seed); None: not one
    family: str | None = None
    #: the route is open to the CORS origins
    cors: bool = False
    #: the served model that answers (the metrics' label), and a fan-out's models
    model: str = UNKNOWN_MODEL
    fanout: list[str] | None = None
    #: "hit" or "miss" when the response cache was asked (the X-Cache header)
    cache: str | None = None
    #: the body could not be decoded (counted as a `protocol` rejection)
    protocol_error: bool = False

    @property
    def labels(self) -> list[str]:
        """The models a request's metrics count under: a fan-out is answered by each of its models."""
        return self.fanout or [self.model]


def context() -> RequestContext:
    """This request's context (the before-request hook made it)."""
    return g.ctx


def maybe_context() -> RequestContext | None:
    """This request's context, or None when the request failed before the hook made one."""
    return g.get("ctx")

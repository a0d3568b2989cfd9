"""CORS for the inference routes: which browser origins may call them, and the preflight answer.

design: off unless `cors_allow_origins` lists origins (`*`: any). A request's `Origin` is matched
exactly against the list (scheme, host and port, case-insensitive as browsers send them) and the
reply names the matched origin from the configuration, never the caller's text, so no header
can be injected through `Origin`. Only the inference routes and model listings get CORS headers or
a preflight answer; admin routes (reload, model control, metrics) never do, so no page can drive
them from a browser. Credentials are not allowed: binserve's auth is a bearer header, which a page
sets itself.
"""

from __future__ import annotations

import re

#: request headers a page may send to an inference route
ALLOW_HEADERS = "Authorization, X-API-Key, Content-Type, Accept, Cache-Control, X-Request-Id, X-Request-Timeout-Ms"
#: reply headers a page may read
EXPOSE_HEADERS = (
    "X-Request-Id, X-Model, X-Model-Version, X-Batch-Size, X-Cache, Server-Timing, Retry-After, retry-after-ms, "
    "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens"
)
MAX_AGE_S = 600
_ORIGIN = re.compile(r"https?://[a-z0-9.-]+(:\d{1,5})?|\*")


class Cors:
    """The configured allow-list."""

    def __init__(self, allow_origins: str) -> None:
        origins = [o.strip().rstrip("/").lower() for o in allow_origins.split(",") if o.strip()]
        for o in origins:
            if not _ORIGIN.fullmatch(o):
                raise ValueError(f"cors_allow_origins: {o!r} is not an origin like https://app.example.com:8443 or *")
        self.any = "*" in origins
        self.origins = {o: o for o in origins if o != "*"}

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allowed(self, origin: str | None) -> str | None:
        """The value of `Access-Control-Allow-Origin` for this request's Origin, or None."""
        if not origin or not self.enabled:
            return None
        if self.any:
            return "*"
        return self.origins.get(origin.strip().lower()) if len(origin) <= 256 else None

    def headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an inference reply to a page of `origin` (none when it is not allowed)."""
        allowed = self.allowed(origin)
        if allowed is None:
            return {}
        out = {"Access-Control-Allow-Origin": allowed, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        if allowed != "*":
            out["Vary"] = "Origin"
        return out

    def preflight(self, origin: str | None, methods: str) -> dict[str, str] | None:
        """The preflight reply's headers, or None when the origin is not allowed."""
        allowed = self.allowed(origin)
        if allowed is None:
            return None
        out = {
            "Access-Control-Allow-Origin": allowed,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S),
        }
        if allowed != "*":
            out["Vary"] = "Origin"
        return out

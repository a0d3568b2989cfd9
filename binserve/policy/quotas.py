"""Quotas per API key: admit or refuse a request, charge its tokens, and the headers that say where
the caller stands (`x-ratelimit-*`, `Retry-After`), as OpenAI's API sends them.

design: a request is admitted in two steps. Before its body is decoded, it takes one request from
the request bucket and needs at least one token left in the token bucket (a key in debt is
refused before any decoding work). Once its input is tokenized (its cost known) it takes its
tokens; refused then, it gives its request back, so a 429 does not spend the quota. Generated
tokens are charged as they are produced and can leave the bucket in debt: the next request waits.
With `redis_url` set the buckets live in Redis and every replica shares them; if Redis cannot be
reached the request is admitted (quotas fail open, counted in `binserve_policy_store_errors_total`
and logged): an outage of the quota store must not take inference down with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from binserve.policy.buckets import NEVER, Levels, Limits, RedisBuckets, shared_table
from binserve.policy.keys import ApiKey, KeyRing

log = logging.getLogger("binserve.policy")
#: after Redis failed, how long requests skip it (admitted) before it is tried again
_STORE_RETRY_S = 1.0


@dataclass(frozen=True)
class Standing:
    """A key's buckets after a step: what the `x-ratelimit-*` headers say, and a refusal's wait."""

    key: ApiKey
    levels: Levels

    @property
    def admitted(self) -> bool:
        return self.levels.admitted

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers for the buckets the key has."""
        out = {}
        (rc, rr), (tc, tr) = self.key.request_bucket(), self.key.token_bucket()
        if rc:
            out["x-ratelimit-limit-requests"] = str(int(self.key.requests_per_minute))
            out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(self.levels.requests)))
            out["x-ratelimit-reset-requests"] = duration(max(0.0, rc - self.levels.requests) / rr)
        if tc:
            out["x-ratelimit-limit-tokens"] = str(int(self.key.tokens_per_minute))
            out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(self.levels.tokens)))
            out["x-ratelimit-reset-tokens"] = duration(max(0.0, tc - self.levels.tokens) / tr)
        if not self.admitted:
            wait = self.levels.retry_after_s
            out["Retry-After"] = str(max(1, math.ceil(wait)))
            out["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))  # the openai package reads this first
        return out


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class Quotas:
    """The buckets of a key ring's limited keys, in the embedded table or in Redis."""

    def __init__(self, ring: KeyRing, redis_client=None, on_store_error=None) -> None:
        self._rows = {k.name: i for i, k in enumerate(ring.keys)}
        self._limits = {k.name: Limits(*k.request_bucket(), *k.token_bucket()) for k in ring.keys}
        self._local = shared_table()
        self._redis = RedisBuckets(redis_client) if redis_client is not None else None
        self._on_store_error = on_store_error or (lambda: None)
        self._redis_down_until = 0.0
        self._lock = threading.Lock()

    def admit_request(self, key: ApiKey) -> Standing:
        """Before decoding: one request, and at least one token left."""
        return self._take(key, 1.0, 0.0, 1.0)

    def admit_tokens(self, key: ApiKey, tokens: int) -> Standing:
        """Once the input is tokenized: its tokens (a request as large as the bucket waits for a
        full bucket); refused, the request taken before is given back."""
        cap = self._limits[key.name].tok_capacity
        standing = self._take(key, 0.0, float(tokens), min(float(tokens), cap))
        if not standing.admitted:
            self._take(key, -1.0, 0.0, NEVER)
        return standing

    def charge(self, key: ApiKey, tokens: int) -> Standing:
        """Tokens already spent (generated): always charged, the bucket may go into debt."""
        return self._take(key, 0.0, float(tokens), NEVER)

    def _take(self, key: ApiKey, requests: float, tokens: float, need: float) -> Standing:
        lim = self._limits[key.name]
        if self._redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                return Standing(key, self._redis.take(0, key.name, lim, requests, tokens, need))
            except Exception as err:  # any failure of the store: connection, timeout, a script error
                with self._lock:
                    self._redis_down_until = time.monotonic() + _STORE_RETRY_S
                self._on_store_error()
                log.warning("quota store unavailable (%s); admitting for %.0f s", type(err).__name__, _STORE_RETRY_S)
                return Standing(key, Levels(True, lim.req_capacity, lim.tok_capacity, 0.0))
        if self._redis is not None:  # Redis is down: admit, as above
            return Standing(key, Levels(True, lim.req_capacity, lim.tok_capacity, 0.0))
        return Standing(key, self._local.take(self._rows[key.name], key.name, lim, requests, tokens, need))

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
#: how long a worker keeps units it took ahead of need before it gives back what it did not use
LEASE_S = 0.25
_MAX_LEASE_REQUESTS = 64
_MAX_LEASE_TOKENS = 32768


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
    if seconds < 0.9995:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass
class _Lease:
    """Units a worker took from the shared buckets ahead of need, and the buckets as it last saw them."""

    requests: float = 0.0
    tokens: float = 0.0
    since: float = 0.0
    shared: Levels | None = None


class Quotas:
    """The buckets of a key ring's limited keys, in the embedded table or in Redis.

    A worker takes a busy key's units a few at a time (a lease: at most a 40th of a second's
    refill, an eighth of the bucket, 64 requests) and admits from them without touching the shared
    store; what it has not used after `LEASE_S` goes back with its next step for that key. The
    shared buckets never give out more than their rate, so no worker can admit beyond the quota;
    a worker that stops getting a key's requests keeps at most its lease (a 40th of a second's
    refill) out of the others' reach. A key limited below 4800 requests (or tokens) a minute is
    never leased: every step is the shared one, exact to the unit. Measured (bench/RESULTS.md):
    the shared step costs ~10 us in process but ~150 us of CPU a request at c=32 across 2 workers
    (threads waiting for the one lock, and for the GIL behind it); Redis costs a round trip.
    """

    def __init__(self, ring: KeyRing, redis_client=None, on_store_error=None) -> None:
        self._rows = {k.name: i for i, k in enumerate(ring.keys)}
        self._limits = {k.name: Limits(*k.request_bucket(), *k.token_bucket()) for k in ring.keys}
        self._chunks = {name: (_chunk(lim.req_capacity, lim.req_rate, _MAX_LEASE_REQUESTS),
                               _chunk(lim.tok_capacity, lim.tok_rate, _MAX_LEASE_TOKENS))
                        for name, lim in self._limits.items()}  # fmt: skip
        self._leases = {k.name: _Lease() for k in ring.keys}
        self._locks = {k.name: threading.Lock() for k in ring.keys}
        self._local = shared_table()
        self._redis = RedisBuckets(redis_client) if redis_client is not None else None
        self._on_store_error = on_store_error or (lambda: None)
        self._redis_down_until = 0.0

    def admit_request(self, key: ApiKey) -> Standing:
        """Before decoding: one request, and at least one token left."""
        lim, lease = self._limits[key.name], self._leases[key.name]
        with self._locks[key.name]:
            now = self._expire(key, lease)
            if lease.requests >= 1 and (not lim.tok_capacity or lease.tokens >= 1):
                lease.requests -= 1
                return self._from_lease(key, lease)
            # the lease goes into the step: its units count towards this request, the rest go back
            need = 1.0 - lease.tokens
            return self._step(key, lease, now, 1.0 - lease.requests, -lease.tokens, need, self._chunks[key.name])

    def admit_tokens(self, key: ApiKey, tokens: int) -> Standing:
        """Once the input is tokenized: its tokens (a request as large as the bucket waits for a
        full bucket); refused, the request taken before is given back."""
        lim, lease = self._limits[key.name], self._leases[key.name]
        with self._locks[key.name]:
            now = self._expire(key, lease)
            if lease.tokens >= tokens:
                lease.tokens -= tokens
                return self._from_lease(key, lease)
            need = min(float(tokens), lim.tok_capacity) - lease.tokens
            extra = (0.0, self._chunks[key.name][1])
            standing = self._step(key, lease, now, 0.0, tokens - lease.tokens, need, extra, keep_requests=True)
            if not standing.admitted:
                lease.requests += 1  # the request's unit, back to this worker's lease
            return standing

    def charge(self, key: ApiKey, tokens: int) -> Standing:
        """Tokens already spent (generated): always charged, the bucket may go into debt."""
        lease = self._leases[key.name]
        with self._locks[key.name]:
            now = self._expire(key, lease)
            if lease.tokens >= tokens:
                lease.tokens -= tokens
                return self._from_lease(key, lease)
            return self._step(key, lease, now, 0.0, tokens - lease.tokens, NEVER, (0.0, 0.0), keep_requests=True)

    def _expire(self, key: ApiKey, lease: _Lease) -> float:
        """Give back what a lease held longer than `LEASE_S` did not use; the time now."""
        now = time.monotonic()
        if (lease.requests or lease.tokens) and now - lease.since > LEASE_S:
            self._store_take(key, -lease.requests, -lease.tokens, NEVER, (0.0, 0.0))
            lease.requests = lease.tokens = 0.0
        return now

    def _step(self, key, lease: _Lease, now: float, requests, tokens, need, extra, keep_requests=False) -> Standing:
        """One step on the shared buckets; admitted, the lease holds what it granted beyond the costs
        (the lease's own units were folded into the costs, so it is replaced; with `keep_requests`,
        its requests were not, and stay)."""
        levels = self._store_take(key, requests, tokens, need, extra)
        if levels.admitted:
            if not keep_requests:
                lease.requests = levels.granted_requests
            lease.tokens = levels.granted_tokens
            lease.since, lease.shared = now, levels
        return Standing(key, levels)

    def _from_lease(self, key: ApiKey, lease: _Lease) -> Standing:
        """Admitted from the lease; the headers count it with the shared buckets as last seen."""
        shared = lease.shared or Levels(True, 0.0, 0.0, 0.0)
        return Standing(key, Levels(True, shared.requests + lease.requests, shared.tokens + lease.tokens, 0.0))

    def _store_take(self, key: ApiKey, requests: float, tokens: float, need: float, extra) -> Levels:
        lim = self._limits[key.name]
        if self._redis is None:
            return self._local.take(self._rows[key.name], key.name, lim, requests, tokens, need, extra)
        if time.monotonic() >= self._redis_down_until:
            try:
                return self._redis.take(0, key.name, lim, requests, tokens, need, extra)
            except Exception as err:  # any failure of the store: connection, timeout, a script error
                self._redis_down_until = time.monotonic() + _STORE_RETRY_S
                self._on_store_error()
                log.warning("quota store unavailable (%s); admitting for %.0f s", type(err).__name__, _STORE_RETRY_S)
        return Levels(True, lim.req_capacity, lim.tok_capacity, 0.0)  # Redis is down: admit (fail open)


def _chunk(capacity: float, rate: float, most: float) -> float:
    """Units a worker may lease of a bucket; 0 (never leased) under 2."""
    if not capacity:
        return 0.0
    units = math.floor(min(most, rate * LEASE_S / 10, capacity / 8))
    return float(units) if units >= 2 else 0.0

"""The policy layer as the routes use it: identify the caller, check its scopes, admit it against
its quotas, and the response cache, built once per worker from the server's settings.

design: the HTTP layer (binserve/api/pipeline.py) calls these in request order - `identify`
before anything is read, `check_model` once the model is named, `admit_request` before decoding,
`admit_tokens` once the input is tokenized, `charge` for generated tokens - so the cheapest
refusal comes first. A request's `Admission` counts into `binserve_key_*` under the key's configured name
once it ends. A server without keys (neither `api_keys_file` nor `auth_token`) lets every caller through as no key.
"""

from __future__ import annotations

from dataclasses import dataclass

from binserve.config import ServerConfig
from binserve.errors import Forbidden, RateLimited, Unauthorized
from binserve.observability import metrics
from binserve.policy.cache import ResponseCache
from binserve.policy.cors import Cors
from binserve.policy.keys import ApiKey, KeyRing
from binserve.policy.quotas import Quotas, Standing

#: how long a request waits on Redis before the store counts as down
REDIS_TIMEOUT_S = 0.25
OUTCOMES = ("admitted", "unauthorized", "forbidden", "rate_limited")
FAMILY_WORDS = {
    "native": "native /infer and /predict", "v2": "KServe V2", "openai": "OpenAI", "generate": "text generation"
}


def redis_client(url: str):
    """A client of the configured Redis, with timeouts short enough that an outage costs little."""
    import redis  # only when configured: the default server needs no Redis

    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)


class Policy:
    """Keys, quotas, cache and CORS of one worker."""

    def __init__(self, ring: KeyRing, cache: ResponseCache, cors: Cors, redis=None) -> None:
        self.ring = ring
        self.cache = cache
        self.cors = cors
        self.quotas = Quotas(ring, redis, lambda: metrics.POLICY_STORE_ERRORS.labels("quota").inc())
        # every series bound once: `labels()` takes a lock per call, and these run on every request
        names = [*ring.names, metrics.NO_KEY]
        self._requests = {(n, o): metrics.KEY_REQUESTS.labels(n, o) for n in names for o in OUTCOMES}
        self._tokens = {n: metrics.KEY_TOKENS.labels(n) for n in ring.names}

    @classmethod
    def from_config(cls, config: ServerConfig) -> Policy:
        """The policy the settings describe; ValueError naming a bad keys file or origin."""
        redis = redis_client(config.redis_url) if config.redis_url else None
        cache = ResponseCache(
            config.response_cache_bytes,
            redis,
            on_evict=lambda model: metrics.CACHE_EVICTIONS.labels(model).inc(),
            on_size=_cache_size,
            on_store_error=lambda: metrics.POLICY_STORE_ERRORS.labels("cache").inc(),
        )
        return cls(
            KeyRing.configured(config.api_keys_file, config.auth_token), cache, Cors(config.cors_allow_origins), redis
        )

    def identify(self, admission: Admission, authorization: str, family: str) -> None:
        """Find the caller's key (none when the server has none); 401 without a valid one, 403 when
        the key may not use this family of routes."""
        if not self.ring.enabled:
            return
        scheme, _, token = authorization.partition(" ")
        admission.outcome = "unauthorized"
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <API key>' (or 'X-API-Key: <API key>')")
        key = self.ring.find(token.strip())
        if key is None:
            raise Unauthorized("the API key is not valid")
        admission.key, admission.outcome = key, "admitted"
        if family not in key.routes:
            admission.outcome = "forbidden"
            allowed = ", ".join(sorted(key.routes))
            raise Forbidden(
                f"API key {key.name!r} may not use the {FAMILY_WORDS[family]} routes (it may use: {allowed})"
            )

    def check_model(self, admission: Admission, model: str) -> None:
        """403 when the key may not use `model` (checked before the model is looked up, so a key
        learns nothing of models it may not use)."""
        key = admission.key
        if key is not None and not key.may_use_model(model):
            admission.outcome = "forbidden"
            raise Forbidden(f"API key {key.name!r} may not use model {model!r}")

    def visible(self, admission: Admission, names: list[str]) -> list[str]:
        """The models of `names` this key may use (model listings show only those)."""
        key = admission.key
        return [n for n in names if key is None or key.may_use_model(n)]

    def admit_request(self, admission: Admission) -> None:
        """Before the body is decoded: one request (429 when the key's quota is spent)."""
        key = admission.key
        if key is not None and key.limited:
            self._settle(admission, self.quotas.admit_request(key))

    def admit_tokens(self, admission: Admission, tokens: int) -> None:
        """Once the input is tokenized: its tokens (429 when they are over the quota)."""
        key = admission.key
        if key is None:
            return
        if key.tokens_per_minute:
            self._settle(admission, self.quotas.admit_tokens(key, tokens))
        self._tokens[key.name].inc(tokens)

    def charge(self, admission: Admission, tokens: int) -> None:
        """Tokens produced (generation), charged as they come."""
        key = admission.key
        if key is None or tokens <= 0:
            return
        if key.tokens_per_minute:
            admission.standing = self.quotas.charge(key, tokens)
        self._tokens[key.name].inc(tokens)

    def count(self, admission: Admission) -> None:
        """A request into the per-key metrics, once, when it ends."""
        name = admission.key.name if admission.key is not None else metrics.NO_KEY
        self._requests[name, admission.outcome].inc()

    def _settle(self, admission: Admission, standing: Standing) -> None:
        admission.standing = standing
        if not standing.admitted:
            admission.outcome = "rate_limited"
            wait = standing.levels.retry_after_s
            raise RateLimited(f"API key {standing.key.name!r} is over its quota; retry in {wait:.1f} s",
                              retry_after_s=wait)  # fmt: skip


@dataclass
class Admission:
    """One request's dealings with the policy: its key, how it ended and its buckets' last standing
    (the per-key request count and the `x-ratelimit-*` headers come from it)."""

    key: ApiKey | None = None
    outcome: str = "admitted"
    standing: Standing | None = None

    def headers(self) -> dict[str, str]:
        return self.standing.headers() if self.standing is not None else {}


def _cache_size(size: int, entries: int) -> None:
    metrics.CACHE_BYTES.set(size)
    metrics.CACHE_ENTRIES.set(entries)

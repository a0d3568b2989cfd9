"""API keys: who a caller is, which models and route families it may use, and its quotas.

design: the keys file (`api_keys_file`) is JSON, `{"keys": [{"name", "key" | "key_sha256",
"models", "routes", "requests_per_minute", "tokens_per_minute", "burst"}]}`. Only SHA-256 digests
are kept in memory: a presented bearer token is hashed once and looked up by its digest, and the
digest found is compared again with `hmac.compare_digest`, so neither the lookup nor the compare
reveals a key by timing (what a lookup can leak is a digest's prefix, which says nothing of a key).
The single `auth_token` setting is one more key, `token`, with every scope and no quota. A file
that does not parse, names a key twice or gives a bad scope stops the server at start with the
reason: a server that cannot read its keys must not run open.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass

from binserve.config import read_json_file

#: the route families a key may be given ("admin" stays with `admin_token`)
FAMILIES = ("native", "v2", "openai", "generate")
#: more keys than this is a mistake (they are metric labels and bucket slots)
MAX_KEYS = 4096
#: a bearer token longer than this is no key of ours: refused before it is hashed
MAX_TOKEN_CHARS = 512
#: the largest file of keys read
MAX_FILE_BYTES = 4 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"name", "key", "key_sha256", "models", "routes", "requests_per_minute", "tokens_per_minute", "burst"}
AUTH_TOKEN_NAME = "token"


def digest(token: str) -> str:
    """The SHA-256 hex digest a key is stored as (`key_sha256` in the file)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One caller: its name (a metric label), scopes and quotas (0: unlimited)."""

    name: str
    sha256: str
    models: frozenset[str] = frozenset({"*"})
    routes: frozenset[str] = frozenset(FAMILIES)
    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    burst: float = 0.0

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def may_use_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def request_bucket(self) -> tuple[float, float]:
        """(capacity, refill per second) of the request bucket; (0, 0) when unlimited. `burst`
        defaults to one second's worth of requests (at least 1)."""
        if not self.requests_per_minute:
            return 0.0, 0.0
        rate = self.requests_per_minute / 60.0
        return (self.burst or max(1.0, math.ceil(rate))), rate

    def token_bucket(self) -> tuple[float, float]:
        """(capacity, refill per second) of the token bucket: the same span of time as the request
        burst covers (one second when requests are unlimited), at least one token."""
        if not self.tokens_per_minute:
            return 0.0, 0.0
        rate = self.tokens_per_minute / 60.0
        capacity_r, rate_r = self.request_bucket()
        span_s = capacity_r / rate_r if rate_r else 1.0
        return max(1.0, rate * span_s), rate


class KeyRing:
    """The configured keys, found by the digest of a presented token."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self._by_digest = {k.sha256: k for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def find(self, token: str) -> ApiKey | None:
        """The key whose token this is, or None."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        d = digest(token)
        found = self._by_digest.get(d)
        if found is None or not hmac.compare_digest(found.sha256, d):
            return None
        return found

    @classmethod
    def configured(cls, api_keys_file: str, auth_token: str) -> KeyRing:
        """The keys of `api_keys_file` (if set) and of `auth_token` (if set); ValueError naming what is
        wrong with the file."""
        keys = load_file(api_keys_file) if api_keys_file else []
        if auth_token:
            if any(k.name == AUTH_TOKEN_NAME for k in keys):
                raise ValueError(f"{api_keys_file}: the key name {AUTH_TOKEN_NAME!r} is auth_token's; use another")
            keys.append(ApiKey(AUTH_TOKEN_NAME, digest(auth_token)))
        if len({k.sha256 for k in keys}) != len(keys):
            raise ValueError(f"{api_keys_file}: two keys have the same secret")
        return cls(keys)


def load_file(path: str) -> list[ApiKey]:
    """The keys in a keys file, each checked (ValueError naming the key and the field)."""
    data = read_json_file(path, MAX_FILE_BYTES, "api_keys_file")
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{path}: must be an object {{"keys": [...]}}')
    if len(entries) > MAX_KEYS:
        raise ValueError(f"{path}: {len(entries)} keys; at most {MAX_KEYS}")
    keys = [_key(e, i, path) for i, e in enumerate(entries)]
    names = [k.name for k in keys]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path}: key names must be unique; {twice} appear twice")
    return keys


def _key(entry, index: int, path: str) -> ApiKey:
    where = f"{path}: keys[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} (known: {sorted(_FIELDS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}: 'name' must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    where = f"{path}: key {name!r}"
    if ("key" in entry) == ("key_sha256" in entry):
        raise ValueError(f"{where}: give exactly one of 'key' and 'key_sha256'")
    if "key" in entry:
        secret = entry["key"]
        if not isinstance(secret, str) or not 16 <= len(secret) <= MAX_TOKEN_CHARS or not secret.isprintable():
            raise ValueError(f"{where}: 'key' must be 16-{MAX_TOKEN_CHARS} printable characters")
        sha = digest(secret)
    else:
        sha = entry["key_sha256"]
        if not isinstance(sha, str) or not _DIGEST.fullmatch(sha):
            raise ValueError(f"{where}: 'key_sha256' must be 64 lowercase hex digits")
    models = _names(entry.get("models", ["*"]), f"{where}: 'models'")
    routes = _names(entry.get("routes", list(FAMILIES)), f"{where}: 'routes'")
    bad = sorted(routes - set(FAMILIES))
    if bad:
        raise ValueError(f"{where}: unknown routes {bad} (known: {list(FAMILIES)})")
    limits = {
        f: _limit(entry.get(f, 0), f"{where}: {f!r}") for f in ("requests_per_minute", "tokens_per_minute", "burst")
    }
    if limits["burst"] and not limits["requests_per_minute"]:
        raise ValueError(f"{where}: 'burst' is the request bucket's size; it needs 'requests_per_minute'")
    return ApiKey(name, sha, models, routes, **limits)


def _names(value, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a non-empty list of names")
    return frozenset(value)


def _limit(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e12:
        raise ValueError(f"{where} must be a number >= 0 (0: unlimited), got {value!r}")
    return float(value)

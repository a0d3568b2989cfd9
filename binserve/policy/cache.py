"""The response cache: a reply of deterministic work (an encoder's, a greedy or seeded completion)
is computed once per (model, served version, canonical request, options) and then answered
without entering a batch.

design: the key is a BLAKE2b digest of the model's name, the version that computed the reply,
the reply options and the request's samples as the adapter validated them (token ids, arrays):
the same text sent by the native, V2 or OpenAI route is one entry, and a reload, which changes the
version, can never be answered from the old version's entries (a reply is stored under the version
its batch ran on, and only when that is the version looked up). Values are the reply encoded as a
binserve frame, so an entry costs its reply's bytes plus a fixed overhead, the shared Redis tier
stores the same bytes, and what comes back from Redis is decoded by the safe decoder like any
request. Each worker keeps an LRU bounded in bytes; a reply larger than a sixteenth of it (or 16
MiB) is not cached, so one reply cannot flush the cache. With Redis configured, a local miss asks
Redis, and a computed reply goes to both. Redis failing is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict

import numpy as np

from binary_protocol import Limits, binary_to_dict, dict_to_binary

log = logging.getLogger("binserve.policy")
#: bytes an entry costs beyond its value (key, list links, bookkeeping)
ENTRY_OVERHEAD = 160
#: no reply larger than this is cached
MAX_ENTRY_BYTES = 16 << 20
#: how long Redis keeps an entry (the key names the version, so this only bounds what Redis holds)
REDIS_TTL_S = 24 * 3600
_REDIS_RETRY_S = 1.0
_REDIS_LIMITS = Limits(max_body_bytes=MAX_ENTRY_BYTES, max_decoded_bytes=4 * MAX_ENTRY_BYTES)


class Uncacheable(Exception):
    """A sample of a type the key cannot describe exactly."""


def _feed(h, obj) -> None:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}".encode())
        h.update(a.data if a.size else b"")
    elif isinstance(obj, (list, tuple)):
        if obj and all(type(x) is int for x in obj):  # a row of token ids: one step, not one per id
            h.update(f"I{len(obj)}".encode())
            h.update(np.asarray(obj, dtype=np.int64).data)
            return
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)}:".encode())
        h.update(b)
    elif obj is None or isinstance(obj, (bool, int, float, np.generic)):
        h.update(f"V{type(obj).__name__}{obj!r};".encode())
    else:
        raise Uncacheable(type(obj).__name__)


def request_key(model: str, version: str, samples: list, options: dict | None, variant: str = "") -> bytes | None:
    """The cache key of a validated request; None when a sample cannot be described exactly."""
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps([model, version, variant], separators=(",", ":")).encode())
    try:
        _feed(h, options or {})
        _feed(h, samples)
    except Uncacheable:
        return None
    return h.digest()


class ResponseCache:
    """A per-worker LRU bounded in bytes, with an optional Redis tier shared by replicas.

    `on_evict(model)` and `on_size(bytes, entries)` report to the metrics."""

    def __init__(self, capacity_bytes: int, redis_client=None, on_evict=None, on_size=None, on_store_error=None):
        self.capacity = capacity_bytes
        self.max_entry = min(MAX_ENTRY_BYTES, capacity_bytes // 16)
        self._entries: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._redis = redis_client
        self._redis_down_until = 0.0
        self._on_evict = on_evict or (lambda model: None)
        self._on_size = on_size or (lambda size, entries: None)
        self._on_store_error = on_store_error or (lambda: None)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get(self, key: bytes) -> dict | None:
        """The cached reply, or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        if found is not None:
            return binary_to_dict(found[1])
        value = self._redis_call("get", _redis_key(key))
        if value is None:
            return None
        try:
            reply = binary_to_dict(value, _REDIS_LIMITS)
        except Exception:  # what another writer put there is not a reply: a miss
            return None
        return reply

    def put(self, key: bytes, model: str, reply: dict) -> bool:
        """Store a computed reply (not when it is too large or does not encode); whether it was."""
        try:
            value = dict_to_binary(reply)
        except (TypeError, ValueError):
            return False
        cost = len(value) + ENTRY_OVERHEAD
        if cost > self.max_entry:
            return False
        evicted = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1]) + ENTRY_OVERHEAD
            self._entries[key] = (model, value)
            self._bytes += cost
            while self._bytes > self.capacity:
                _, (m, v) = self._entries.popitem(last=False)
                self._bytes -= len(v) + ENTRY_OVERHEAD
                evicted.append(m)
            size, entries = self._bytes, len(self._entries)
        for m in evicted:
            self._on_evict(m)
        self._on_size(size, entries)
        self._redis_call("set", _redis_key(key), value, ex=REDIS_TTL_S)
        return True

    def _redis_call(self, method: str, *args, **kwargs):
        if self._redis is None or time.monotonic() < self._redis_down_until:
            return None
        try:
            return getattr(self._redis, method)(*args, **kwargs)
        except Exception as err:  # the shared tier is an optimisation: its failure is a miss
            self._redis_down_until = time.monotonic() + _REDIS_RETRY_S
            self._on_store_error()
            log.warning("response cache's Redis unavailable (%s); local cache only for %.0f s",
                        type(err).__name__, _REDIS_RETRY_S)  # fmt: skip
            return None


def _redis_key(key: bytes) -> str:
    return "binserve:cache:" + key.hex()

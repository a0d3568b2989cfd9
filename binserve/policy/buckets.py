"""Token buckets that every worker of a replica (or every replica, through Redis) shares exactly.

design: a key has two buckets, requests and tokens, kept in one record (levels and the time they
were last brought up to date) and updated in one step under one lock, so N workers never each
allow the full quota and no update is lost. `take` refills both buckets for the time that passed,
then either admits (subtracting the costs) or refuses (changing nothing) and says how long until
it would admit. A request costs 1 from the request bucket; tokens are taken where they are known
(input tokens after tokenizing) and admitted while the bucket holds `need` of them (`min(cost,
capacity)`), so a request larger than the whole bucket still runs once the bucket is full and
leaves it in debt; generated tokens are charged as they come (`need` = -inf: always). The
embedded store is a table in shared memory made by the Gunicorn master before it forks (as
`process.coreshare` is), under a semaphore that a dead holder cannot keep (`SharedTable`); the
Redis store runs the same arithmetic as one Lua script, on Redis's clock.
This module imports neither Flask nor prometheus_client: the master loads it.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import multiprocessing
import os
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass

#: buckets of this many keys fit in the embedded table (keys.MAX_KEYS)
ROWS = 4096
_ROW = struct.Struct("<dddq")  # request level, token level, stamp (0: never used), name check
_HOLDER = struct.Struct("<q")  # the pid holding the lock (0: none), before the rows
#: a taker that waited this long checks whether the lock's holder died
_LOCK_WAIT_S = 0.5
NEVER = -math.inf  # a `need` that always admits (a charge after the fact)


@dataclass(frozen=True)
class Limits:
    """A key's two buckets: capacity and refill per second each (capacity 0: unlimited)."""

    req_capacity: float
    req_rate: float
    tok_capacity: float
    tok_rate: float


@dataclass(frozen=True)
class Levels:
    """What `take` found and did: admitted or not, the levels after it, and the wait until it would admit."""

    admitted: bool
    requests: float
    tokens: float
    retry_after_s: float
    #: units granted beyond the costs, for the taker to spend later (`extra` of `take`)
    granted_requests: float = 0.0
    granted_tokens: float = 0.0


def settle(
    levels: tuple[float, float, float], now: float, lim: Limits, requests: float, tokens: float, need: float,
    extra: tuple[float, float] = (0.0, 0.0),
):  # fmt: skip
    """The arithmetic both stores run: the outcome from the stored (request level, token level,
    stamp), and the state to store. A stamp <= 0 is a bucket never used: it starts full (times are
    `time.monotonic()`, which counts from boot). Admitted, it also grants up to `extra` (requests,
    tokens) more of what the buckets still hold, whole units, for a worker's lease."""
    req, tok, stamp = levels
    if stamp <= 0:
        req, tok, stamp = lim.req_capacity, lim.tok_capacity, now
    dt = max(0.0, now - stamp)
    req = min(lim.req_capacity, req + dt * lim.req_rate)
    tok = min(lim.tok_capacity, tok + dt * lim.tok_rate)
    wait = 0.0
    if lim.req_capacity and requests > 0 and req < requests:
        wait = (requests - req) / lim.req_rate
    if lim.tok_capacity and tok < need:
        wait = max(wait, (need - tok) / lim.tok_rate)
    if wait > 0:
        return Levels(False, req, tok, wait), (req, tok, now)
    req = min(lim.req_capacity, req - requests) if lim.req_capacity else 0.0
    tok = min(lim.tok_capacity, tok - tokens) if lim.tok_capacity else 0.0
    grant_r = min(extra[0], math.floor(max(0.0, req))) if lim.req_capacity else 0.0
    grant_t = min(extra[1], math.floor(max(0.0, tok))) if lim.tok_capacity else 0.0
    req, tok = req - grant_r, tok - grant_t
    return Levels(True, req, tok, 0.0, grant_r, grant_t), (req, tok, now)


def _name_check(name: str) -> int:
    return zlib.crc32(name.encode()) + 1  # never 0: 0 marks a row no key has used


class SharedTable:
    """The embedded store: one row per key in shared memory inherited by every worker forked after
    `create`; without Gunicorn, the process's own.

    The lock is a POSIX semaphore (`multiprocessing.Lock`), only ever tried (`_acquire`): a free
    one is taken without letting go of the GIL, so the few microseconds it is held are never spent
    waiting for the GIL. A record lock (`fcntl`) lets go of the GIL on every call and waits for it
    again behind the worker's other threads while holding the lock: measured ~240 us a request at
    c=32. A semaphore is not released by the kernel when its holder dies, so the holder writes its
    pid beside the table; a taker that waited `_LOCK_WAIT_S` checks that pid and, when that process
    is gone, frees the lock (once: under a record lock, which the kernel does free).
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _HOLDER.size + ROWS * _ROW.size)  # anonymous, MAP_SHARED: forks share it
        self._lock = multiprocessing.Lock()
        fd, path = tempfile.mkstemp(prefix="binserve-quotas-")
        os.unlink(path)  # only its record lock is used; nothing is left on disk
        self._recovery_fd = fd

    def take(
        self, row: int, name: str, lim: Limits, requests: float, tokens: float, need: float, extra=(0.0, 0.0)
    ) -> Levels:
        offset = _HOLDER.size + (row % ROWS) * _ROW.size
        check = _name_check(name)
        self._acquire()
        try:
            _HOLDER.pack_into(self._map, 0, os.getpid())
            req, tok, stamp, owner = _ROW.unpack_from(self._map, offset)
            if owner != check:  # another key had this row (the keys file changed): start full
                stamp = 0.0
            result, state = settle((req, tok, stamp), time.monotonic(), lim, requests, tokens, need, extra)
            _ROW.pack_into(self._map, offset, *state, check)
            _HOLDER.pack_into(self._map, 0, 0)
        finally:
            self._lock.release()
        return result

    def _acquire(self) -> None:
        waited_since = None
        while not self._lock.acquire(block=False):
            # Let go of the GIL and try again, rather than block on the semaphore: a thread woken
            # by the semaphore would hold it while it waits for the GIL behind its process's other
            # threads, and every worker's takers would queue behind that wait (a convoy, measured
            # at ~300 us a request at c=32). Taken only with the GIL held, it is held for microseconds.
            time.sleep(0)
            now = time.monotonic()
            if waited_since is None:
                waited_since = now
            elif now - waited_since > _LOCK_WAIT_S:
                self._recover()
                waited_since = None

    def _recover(self) -> None:
        """Free the lock when the process holding it is gone (once, under a record lock)."""
        (holder,) = _HOLDER.unpack_from(self._map, 0)
        if not holder or _alive(holder):
            return
        fcntl.lockf(self._recovery_fd, fcntl.LOCK_EX)
        try:
            if _HOLDER.unpack_from(self._map, 0)[0] == holder:  # nobody freed it meanwhile
                _HOLDER.pack_into(self._map, 0, 0)
                self._lock.release()
        finally:
            fcntl.lockf(self._recovery_fd, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_table: SharedTable | None = None
_table_lock = threading.Lock()


def create() -> None:
    """In the Gunicorn master, before workers fork: the table every worker will share."""
    global _table
    _table = SharedTable()


def shared_table() -> SharedTable:
    """The table made by `create` in the master, or this process's own."""
    global _table
    with _table_lock:
        if _table is None:
            _table = SharedTable()
        return _table


# The same arithmetic as `settle`, atomically in Redis, on Redis's clock. Numbers go back as
# strings: Redis turns a Lua number into an integer.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rc, rr, tc, tr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost_r, cost_t, need = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local s = redis.call('HMGET', KEYS[1], 'r', 't', 's')
local req, tok, stamp = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
if not stamp then req, tok, stamp = rc, tc, now end
local dt = math.max(0, now - stamp)
req = math.min(rc, req + dt * rr)
tok = math.min(tc, tok + dt * tr)
local wait = 0
if rc > 0 and cost_r > 0 and req < cost_r then wait = (cost_r - req) / rr end
if tc > 0 and tok < need then wait = math.max(wait, (need - tok) / tr) end
local ok, grant_r, grant_t = 0, 0, 0
if wait <= 0 then
  ok = 1
  if rc > 0 then req = math.min(rc, req - cost_r) else req = 0 end
  if tc > 0 then tok = math.min(tc, tok - cost_t) else tok = 0 end
  if rc > 0 then grant_r = math.min(tonumber(ARGV[9]), math.floor(math.max(0, req))) end
  if tc > 0 then grant_t = math.min(tonumber(ARGV[10]), math.floor(math.max(0, tok))) end
  req, tok = req - grant_r, tok - grant_t
end
redis.call('HSET', KEYS[1], 'r', tostring(req), 't', tostring(tok), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[8]))
return {ok, tostring(req), tostring(tok), tostring(wait), tostring(grant_r), tostring(grant_t)}
"""


class RedisBuckets:
    """The store every replica shares: one hash per key under `binserve:quota:<name>`."""

    def __init__(self, client) -> None:
        self._script = client.register_script(_LUA)

    def take(
        self, row: int, name: str, lim: Limits, requests: float, tokens: float, need: float, extra=(0.0, 0.0)
    ) -> Levels:
        # a bucket left alone refills completely: Redis may forget it a minute after that
        full_s = max(
            lim.req_capacity / lim.req_rate if lim.req_rate else 0.0,
            lim.tok_capacity / lim.tok_rate if lim.tok_rate else 0.0,
        )
        ttl_ms = int((full_s + 60) * 1000)
        need_arg = -1e300 if need == NEVER else need  # Lua's tonumber may not read "-inf"
        args = [lim.req_capacity, lim.req_rate, lim.tok_capacity, lim.tok_rate, requests, tokens, need_arg, ttl_ms]
        ok, req, tok, wait, grant_r, grant_t = self._script(keys=[f"binserve:quota:{name}"], args=[*args, *extra])
        return Levels(bool(int(ok)), float(req), float(tok), float(wait), float(grant_r), float(grant_t))

"""The request pipeline every protocol shares: read, authorize, validate, submit, wait, time.

design: a blueprint translates its wire shape into an adapter payload, hands it to
`Pipeline.infer`, and translates the adapter's reply back; limits, deadlines, the batcher,
`Server-Timing` and the request metrics are the same whichever protocol a request came in by, so a
V2 or OpenAI request is batched with native requests for the same model; the policy layer's steps
(key, scopes, quotas, cache) are taken here in request order. `hooks.py` adds the per-request
bookkeeping around it.
"""

from __future__ import annotations

import contextlib
import hmac
import select
import socket
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from flask import request

from binary_protocol import Limits, decode_body, json_to_dict
from binserve.api.context import RequestContext, context
from binserve.config import ServerConfig
from binserve.errors import (
    BadRequest,
    DeadlineExceeded,
    Forbidden,
    LimitExceeded,
    ModelNotFound,
    RequestTimeout,
    ServingError,
    Unauthorized,
    UnsupportedMediaType,
)
from binserve.observability import metrics
from binserve.policy.cache import request_key
from binserve.policy.gate import Policy
from binserve.process import stamps
from binserve.scheduling.contract import BatchResult
from binserve.serving.contract import ModelHost, ServedModel
from binserve.wire.media import is_json, json_limit_hint, media_type
from models.contract import Validated

# How long a request thread waits past its deadline for a batch that already started.
_DEADLINE_GRACE_S = 5.0
# The longest deadline a caller may ask for.
_MAX_TIMEOUT_MS = 3_600_000


def no_cache_requested() -> tuple[bool, bool]:
    """(do not read the cache, do not write it) from the request's `Cache-Control`."""
    directives = {d.strip().split("=")[0].lower() for d in request.headers.get("Cache-Control", "").split(",")}
    return ("no-cache" in directives or "no-store" in directives), "no-store" in directives


def read_body(config: ServerConfig) -> bytes:
    """The request body, read to at most its limit + 1 byte: 413 past it, whatever the framing.

    A declared length is checked before anything is read; a chunked body (no length) is cut at
    limit + 1 bytes, which proves it too large. JSON has its own, smaller limit.
    """
    json_body = is_json(request.content_type)
    limit = config.max_json_bytes if json_body else config.max_body_bytes
    what = "JSON body" if json_body else "body"
    declared = request.content_length
    if declared is not None and declared > limit:
        hint = json_limit_hint(config.max_body_bytes) if json_body else ""
        raise LimitExceeded(f"{what} of {declared} bytes is over the {limit}-byte limit{hint}")
    stream = request.environ["wsgi.input"]
    try:
        body = stream.read(limit + 1) if declared is None else stream.read(declared)
    except OSError:  # the socket timed out (client_timeout_s) or broke mid-body
        raise RequestTimeout(f"the body did not arrive within client_timeout_s={config.client_timeout_s}") from None
    if len(body) > limit:
        hint = json_limit_hint(config.max_body_bytes) if json_body else ""
        raise LimitExceeded(f"{what} is over the {limit}-byte limit{hint}")
    if declared is not None and len(body) < declared:
        raise BadRequest(f"the body ended after {len(body)} of its {declared} declared bytes")
    return body


def authorization() -> str:
    """The caller's credentials as an Authorization value: the header itself, or `X-API-Key: <key>`
    (the header the Flask card's clients send) read as `Bearer <key>`; the same keys, scopes and quotas."""
    header = request.headers.get("Authorization")
    if header is None:
        key = request.headers.get("X-API-Key")
        if key:
            return f"Bearer {key}"
    return header or ""


def check_token(expected: str) -> None:
    """Bearer-token check in constant time; 401 without a token, 403 with a wrong one."""
    header = authorization()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>' (or 'X-API-Key: <token>')")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Forbidden("the bearer token is not valid")


def client_gone_check(environ: dict):
    """A check that the client hung up, from the socket Gunicorn puts in the environ (None if absent)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # readable with no data to peek at means EOF: the client closed its side
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


def arrival_timing(started: float) -> str:
    """`Server-Timing`'s stages before the app: `wait` (the request, whole in the worker's event loop,
    until a request thread took it) and `parse` (Gunicorn's parser and the WSGI call, until the app's
    first hook at `started`); empty outside binserve's worker."""
    stamped = stamps.since_arrival()
    if stamped is None:
        return ""
    arrived, dispatched = stamped
    return f"wait;dur={(dispatched - arrived) * 1000:.2f}, parse;dur={(started - dispatched) * 1000:.2f}, "


@contextlib.contextmanager
def naming(name: str | None):
    """A ServingError raised inside, raised again naming the model it came from (same class and
    status): a fan-out's parts say which model refused; a one-model request (None) is left as is."""
    try:
        yield
    except ServingError as err:
        if name is None:
            raise
        raise type(err)(f"model {name!r}: {err.message}", retry_after_s=err.retry_after_s) from None


@dataclass
class Part:
    """One model's share of a request: its validated input, and once served, its reply."""

    loaded: ServedModel
    validated: Validated
    #: the version the caller asked for (V2's URL): a reply from any other is a 404
    version: str | None = None
    reply: dict | None = None
    result: BatchResult | None = None
    #: the response cache's key (None: not cached) and the version it was made for
    key: bytes | None = field(default=None, repr=False)
    looked_up: str = ""

    @property
    def name(self) -> str:
        return self.loaded.name


@dataclass
class Served:
    """A request's parts, each with its reply and how its time was spent."""

    ctx: RequestContext
    parts: list[Part]
    decoded: float

    @property
    def reply(self) -> dict:
        """A one-model request's reply."""
        return self.parts[0].reply

    @property
    def validated(self) -> Validated:
        return self.parts[0].validated

    @property
    def result(self) -> BatchResult:
        return self.parts[0].result

    @property
    def replies(self) -> dict[str, dict]:
        """A fan-out's replies by model name."""
        return {p.name: p.reply for p in self.parts}

    def headers(self, encode_s: float) -> dict[str, str]:
        """The metadata headers every protocol sends with a reply: one model's version, batch size
        and stages (the adapter's own steps, e.g. decode-image, included), or a fan-out's per model
        (`queue-<model>`, `infer-<model>`, `name=value` lists)."""
        ctx = self.ctx
        timing = [f"{arrival_timing(ctx.started)}decode;dur={(self.decoded - ctx.started) * 1000:.2f}"]
        if ctx.fanout is None:
            part = self.parts[0]
            r = part.result
            timing += [f"queue;dur={r.queue_s * 1000:.2f}", f"infer;dur={r.infer_s * 1000:.2f}",
                       f"encode;dur={encode_s * 1000:.2f}"]  # fmt: skip
            timing += [f"{step};dur={seconds * 1000:.2f}" for step, seconds in part.validated.timing.items()]
            version, batch = str(r.tag), str(r.batch_size)
        else:
            for p in self.parts:
                r = p.result
                timing += [f"queue-{p.name};dur={r.queue_s * 1000:.2f}", f"infer-{p.name};dur={r.infer_s * 1000:.2f}"]
            timing.append(f"encode;dur={encode_s * 1000:.2f}")
            version = ",".join(f"{p.name}={p.result.tag}" for p in self.parts)
            batch = ",".join(f"{p.name}={p.result.batch_size}" for p in self.parts)
        return {
            "X-Request-Id": ctx.request_id,
            "X-Model-Version": version,
            "X-Model": ",".join(p.name for p in self.parts),
            "X-Batch-Size": batch,
            "Server-Timing": ", ".join(timing),
        }


class Pipeline:
    """The shared steps of an inference request, for one app's config and model manager."""

    def __init__(self, config: ServerConfig, manager: ModelHost, policy: Policy | None = None) -> None:
        self.config = config
        self.manager = manager
        self.policy = policy if policy is not None else Policy.from_config(config)
        self.limits = Limits(
            max_body_bytes=config.max_body_bytes,
            max_json_bytes=config.max_json_bytes,
            max_decoded_bytes=config.max_decoded_bytes,
        )

    def authorize(self, family: str) -> None:
        """The caller's API key, when the server has keys: 401 without one, 403 when it may not use
        this `family` of routes (native, v2, openai, generate)."""
        self.policy.identify(context().admission, authorization(), family)

    def admit(self, family: str) -> None:
        """`authorize`, then one request of the key's quota (429 when spent), before anything is decoded."""
        self.authorize(family)
        self.policy.admit_request(context().admission)

    def admit_tokens(self, tokens: int) -> None:
        """The key's token quota for input whose size is now known (429 when over)."""
        self.policy.admit_tokens(context().admission, tokens)

    def charger(self):
        """`charge_upto(total)`: charges the tokens produced so far (generation) that were not
        charged yet to this request's key. It holds the request's admission, so a streamed reply
        can call it after the view returned."""
        admission, policy, charged = context().admission, self.policy, [0]

        def charge_upto(total: int) -> None:
            if total > charged[0]:
                policy.charge(admission, total - charged[0])
                charged[0] = total

        return charge_upto

    def body(self) -> bytes:
        """The request body within its limit (see `read_body`)."""
        return read_body(self.config)

    def json_object(self) -> dict:
        """A JSON-only route's body (no Content-Type is taken as JSON; any other is 415)."""
        if request.content_type and not is_json(request.content_type):
            raise UnsupportedMediaType(f"send application/json, not {media_type(request.content_type)!r}")
        return json_to_dict(self.body(), self.limits)

    def decode(self) -> tuple[dict, str]:
        """The body decoded by the native protocol's rules: (payload, format)."""
        return decode_body(self.body(), request.content_type, self.limits)

    def deadline(self, timeout_ms: float | None = None, what: str = "X-Request-Timeout-Ms") -> float:
        """The request's deadline: `timeout_ms` (a protocol's own field), else the header, else the default."""
        started = context().started
        raw = request.headers.get("X-Request-Timeout-Ms") if timeout_ms is None else timeout_ms
        if raw is None:
            return started + self.config.request_timeout_s
        try:
            ms = float(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{what} must be a number of milliseconds, got {raw!r}") from None
        if not 0 < ms <= _MAX_TIMEOUT_MS:
            raise BadRequest(f"{what} must be in (0, {_MAX_TIMEOUT_MS}] milliseconds, got {raw!r}")
        return started + ms / 1000.0

    def model(self, name: str | None, version: str | None = None) -> ServedModel:
        """The served model `name` (None: the default); 404 when `version` is given and not the one served."""
        ctx = context()
        self.policy.check_model(ctx.admission, name if name is not None else self.manager.default_name)
        loaded = self.manager.get(name)
        ctx.model = loaded.name
        if version is not None and version != loaded.adapter.version:
            raise ModelNotFound(self._version_message(loaded, version))
        return loaded

    def _version_message(self, loaded: ServedModel, version: str) -> str:
        served = loaded.adapter.version
        try:
            known = version in self.manager.repo.versions(loaded.name)
        except OSError:
            known = False
        where = "is in the repository but not served" if known else "does not exist"
        return f"version {version!r} of model {loaded.name!r} {where}; this server serves version {served!r}"

    def submit(self, loaded: ServedModel, validated: Validated, deadline: float) -> Future:
        """Queue a validated request on the model's batcher (429 when full, 413 when it never fits)."""
        return loaded.scheduler.submit(validated.samples, deadline, client_gone_check(request.environ))

    def wait(self, loaded: ServedModel, future: Future, deadline: float) -> BatchResult:
        """The batch's result, or 504 once the deadline (plus a grace for a batch under way) passed."""
        try:
            result = future.result(timeout=max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S)
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded("the request's deadline passed while its batch was still running") from None
        metrics.QUEUE_DURATION.labels(loaded.name).observe(result.queue_s)
        return result

    def infer(self, loaded: ServedModel, payload: dict, deadline: float, version: str | None = None) -> Served:
        """Validate `payload` for the model, charge its tokens and serve it (`serve`): a request to
        one model is a fan-out of one."""
        validated = loaded.adapter.validate(payload)
        self.admit_tokens(input_tokens(loaded.adapter, validated))
        return self.serve([Part(loaded, validated, version)], deadline)

    def serve(self, parts: list[Part], deadline: float) -> Served:
        """The core every inference request goes through, whatever its protocol and however many
        models it names: each part is answered from the response cache or queued on its model's
        batcher - every part queued before any is waited on, so the models run side by side -
        then checked against the version it asked for, joined into its reply and cached. All or
        nothing: the first part that fails fails the request (naming its model in a fan-out),
        and the parts not started yet are cancelled."""
        ctx = context()
        decoded = time.monotonic()
        fan = ctx.fanout is not None  # a request naming its models (even one) is answered per model
        futures: dict[int, Future] = {}
        try:
            for i, part in enumerate(parts):
                with naming(part.name if fan else None):
                    if not self._cached(part):
                        futures[i] = self.submit(part.loaded, part.validated, deadline)
            for i, future in futures.items():
                part = parts[i]
                with naming(part.name if fan else None):
                    part.result = self.wait(part.loaded, future, deadline)
        finally:
            for future in futures.values():
                future.cancel()  # parts not started yet, when another part failed; a no-op for finished ones
        for i in futures:
            part = parts[i]
            if part.version is not None and str(part.result.tag) != part.version:  # a reload landed meanwhile
                raise ModelNotFound(self._version_message(part.loaded, part.version))
            v = part.validated
            part.reply = part.loaded.adapter.join(part.result.outputs, v.batched, v.options)
            self.cache_store(part.key, part.loaded, part.looked_up, str(part.result.tag), part.reply)
        return Served(ctx, parts, decoded)

    def _cached(self, part: Part) -> bool:
        """Answer `part` from the response cache when it holds its reply (a batch size of 0, no
        queue, no inference); `cache_lookup` counts the lookup and keeps the request's X-Cache."""
        loaded, v = part.loaded, part.validated
        part.looked_up = loaded.adapter.version  # the key's version, whatever reload lands meanwhile
        variant = "batched" if v.batched else "single"
        part.key, cached = self.cache_lookup(loaded, v.samples, v.options, variant, part.looked_up)
        if cached is None:
            return False
        part.reply, part.result = cached, BatchResult([], 0, 0.0, 0.0, part.looked_up)
        return True

    def cache_lookup(self, loaded: ServedModel, samples: list, options: dict, variant: str, version: str):
        """(key, cached reply or None) for a request that `version` validated (the version a hit
        is labelled with: the same one the entry is keyed by, whatever reload lands meanwhile); key
        None when the request is not cached (no cache, the model's cache off, or a sample the key
        cannot describe). Counts the lookup; the request's X-Cache says `hit` when every lookup
        of it hit (a fan-out looks up each model), else `miss`."""
        if not (self.policy.cache.enabled and loaded.cacheable):
            return None, None
        key = request_key(loaded.name, version, samples, options, variant)
        if key is None:
            return None, None
        skip_read, _ = no_cache_requested()
        cached = None if skip_read else self.policy.cache.get(key)
        result = "bypass" if skip_read else ("hit" if cached is not None else "miss")
        metrics.CACHE_REQUESTS.labels(loaded.name, result).inc()
        ctx = context()
        ctx.cache = "hit" if cached is not None and ctx.cache in (None, "hit") else "miss"
        return key, cached

    def cache_store(self, key: bytes | None, loaded: ServedModel, looked_up: str, ran_on: str, reply: dict) -> None:
        """Keep a computed reply, only under the version it was looked up for and ran on: a request
        that a reload overtook leaves no entry that either version could be answered from."""
        if key is None:
            return
        _, skip_write = no_cache_requested()
        if not skip_write and looked_up == ran_on:
            self.policy.cache.put(key, loaded.name, reply)


def input_tokens(adapter, validated: Validated) -> int:
    """The tokens a validated request puts into the model (0 for array models)."""
    if not adapter.token_inputs:
        return 0
    return sum(len(s) for s in validated.samples)

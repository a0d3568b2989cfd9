"""The binserve client: send a dict of arrays / token ids / texts, get the model's outputs back.

design: `InferenceClient` owns one `requests.Session` (one keep-alive connection pool) and speaks
the framed binary format by default. Replies are decoded with the same safe decoder the server
uses, so a client never unpickles what a server (or something pretending to be one) sent. Retries
happen only where they cannot duplicate a side effect that matters - inference is idempotent - and
only for failures that a retry can fix: connection refused/reset, a reply cut off mid-body (the
server died sending it), 429 and 503, and a gateway's 502
or 504 (a load balancer whose replica died or hung under the request: another replica can answer
it; binserve's own 504 is the request's deadline and is not retried),
waiting for the server's Retry-After when it gives one, else exponential backoff with jitter. Other non-2xx replies
raise the typed error from `errors` that the server reported (`errors.Overloaded`, ...).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass

import requests
from requests.structures import CaseInsensitiveDict

from binary_protocol import FRAMED, JSON, MEDIA_TYPES, decode_body, dict_to_binary, dict_to_json
from binserve.errors import ServingError, error_from_reply

__all__ = ["InferenceClient", "Reply", "ServingError", "send_inference_request"]

DEFAULT_URL = "http://127.0.0.1:8000/infer"
_RETRY_STATUSES = frozenset({429, 503})
#: what a load balancer or proxy answers when the replica behind it died (502) or hung (504) under
#: the request; retried unless a binserve server sent it (its own 504 is the request's deadline)
_GATEWAY_STATUSES = frozenset({502, 504})


@dataclass(frozen=True)
class Reply:
    """A successful reply: the decoded outputs and the metadata headers the server sent."""

    outputs: dict
    headers: dict
    status: int

    @property
    def model_version(self) -> str | None:
        """`X-Model-Version`: the version of the model that computed these outputs."""
        return self.headers.get("X-Model-Version")

    @property
    def batch_size(self) -> int | None:
        """`X-Batch-Size`: how many samples shared the forward pass that served this request."""
        v = self.headers.get("X-Batch-Size")
        return int(v) if v is not None else None

    @property
    def request_id(self) -> str | None:
        """`X-Request-Id`, to find this request in the server's logs."""
        return self.headers.get("X-Request-Id")


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date; fall back to our own backoff


def _raise_for(resp: requests.Response) -> None:
    """Turn a non-2xx reply into the typed error the server reported."""
    error_type, message = None, resp.text[:500] or resp.reason
    try:
        body = json.loads(resp.content)
        error_type = body["error"]["type"]
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    raise error_from_reply(resp.status_code, error_type, message, _retry_after(resp))


class InferenceClient:
    """A reusable client for one binserve server; thread-safe for concurrent `infer` calls."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        fmt: str = FRAMED,
        session: requests.Session | None = None,
    ) -> None:
        if fmt not in MEDIA_TYPES:
            raise ValueError(f"fmt must be one of {sorted(MEDIA_TYPES)}, got {fmt!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.fmt = fmt
        self.session = session or requests.Session()
        self._own_session = session is None
        self.retried = 0  # requests sent again so far (what a retry saved, or tried to)
        self._count = threading.Lock()

    def close(self) -> None:
        """Close the connection pool (only if this client created it)."""
        if self._own_session:
            self.session.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def url_for(self, model: str | None) -> str:
        """The /infer URL for `model` (the server's default model when None)."""
        return f"{self.base_url}/infer" + (f"/{model}" if model else "")

    def request(
        self,
        data: dict,
        *,
        model: str | None = None,
        timeout_ms: int | None = None,
        headers: dict | None = None,
    ) -> Reply:
        """POST `data` to /infer[/model]; returns the decoded `Reply` or raises a `ServingError`."""
        body = dict_to_json(data) if self.fmt == JSON else dict_to_binary(data)
        hdrs = {"Content-Type": MEDIA_TYPES[self.fmt], "Accept": MEDIA_TYPES[self.fmt]}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if timeout_ms is not None:
            hdrs["X-Request-Timeout-Ms"] = str(int(timeout_ms))
        if headers:
            hdrs.update(headers)
        resp = self._post(self.url_for(model), body, hdrs)
        outputs, _ = decode_body(resp.content, resp.headers.get("Content-Type"))
        # header names are case-insensitive, and proxies speaking HTTP/2 or HAProxy send them lowercase
        return Reply(outputs=outputs, headers=CaseInsensitiveDict(resp.headers), status=resp.status_code)

    def infer(self, data: dict, *, model: str | None = None, timeout_ms: int | None = None) -> dict:
        """POST `data` and return the model's outputs as a dict (e.g. `{"embeddings": ...}`)."""
        return self.request(data, model=model, timeout_ms=timeout_ms).outputs

    def _sleep_before_retry(self, attempt: int, hint: float | None) -> None:
        with self._count:
            self.retried += 1
        if hint is not None:
            delay = min(hint, self.max_backoff_s)
        else:
            delay = min(self.backoff_s * (2**attempt), self.max_backoff_s)
            delay *= random.uniform(0.5, 1.5)  # jitter so that many clients do not retry in step
        time.sleep(delay)

    def _post(self, url: str, body: bytes, headers: dict) -> requests.Response:
        attempt = 0
        while True:
            try:
                resp = self.session.post(url, data=body, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                # Refused or reset, or the reply cut off mid-body (the server died while sending
                # it): inference is idempotent, so sending again is safe.
                if attempt >= self.retries:
                    raise
                self._sleep_before_retry(attempt, None)
                attempt += 1
                continue
            if resp.status_code < 300:
                return resp
            retry = resp.status_code in _RETRY_STATUSES or (
                resp.status_code in _GATEWAY_STATUSES and "json" not in resp.headers.get("Content-Type", "")
            )
            if retry and attempt < self.retries:
                self._sleep_before_retry(attempt, _retry_after(resp))
                attempt += 1
                continue
            _raise_for(resp)


def send_inference_request(
    data: dict,
    url: str = DEFAULT_URL,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    token: str | None = None,
    session: requests.Session | None = None,
    model: str | None = None,
) -> dict:
    """Send one request to a binserve `/infer` URL and return the decoded outputs.

    `url` is the full /infer URL (`model` appends `/<model>` to it). Pass a `requests.Session`
    to reuse connections across calls, or use `InferenceClient` directly.
    """
    base, sep, rest = url.rstrip("/").rpartition("/infer")
    if not sep or (rest and not rest.startswith("/")):
        raise ValueError(f"url must end in /infer or /infer/<model>, got {url!r}")
    model = model or rest[1:] or None
    client = InferenceClient(base, token=token, timeout=timeout, retries=retries, session=session)
    try:
        return client.infer(data, model=model)
    finally:
        client.close()

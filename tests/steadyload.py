"""A steady load of `request_tools` clients against one URL (a server, or a load balancer in front
of replicas) while a test does something to it: what a user's clients would have seen, counted."""

from __future__ import annotations

import threading
import time

from request_tools import InferenceClient
from tests.serverproc import poll

TEXTS = [f"a sentence for the replicas, number {i}" for i in range(8)]


class Load:
    """`clients` threads of `request_tools` clients sending small requests through `url` until stopped;
    each reply's model version and first embedding are kept (`replies`) for checks."""

    def __init__(self, url: str, clients: int = 8, retries: int = 3) -> None:
        self.clients = clients
        self.sent = self.ok = 0
        self.replies: list[tuple[str | None, object]] = []
        # per reply: (version, replica, when its request was sent)
        self.served_by: list[tuple[str | None, str | None, float]] = []
        self.failures: list[str] = []
        self.retried = 0
        self.longest_s = 0.0  # the slowest request, retries included, as its caller waited for it
        self.retry_causes: dict[str, int] = {}  # what the client retried: a status or an exception's name
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(url, retries)) for _ in range(clients)]

    def _run(self, url: str, retries: int) -> None:
        with InferenceClient(url, timeout=60, retries=retries, backoff_s=0.1) as client:
            post = client.session.post

            def watched(*args, **kwargs):  # sees each attempt the client makes, not only the last
                try:
                    resp = post(*args, **kwargs)
                except Exception as exc:
                    self._cause(type(exc).__name__)
                    raise
                if resp.status_code >= 300:
                    self._cause(str(resp.status_code))
                return resp

            client.session.post = watched
            while not self._stop.is_set():
                sent_at = time.monotonic()
                try:
                    reply = client.request({"texts": TEXTS})
                    outcome = None
                except Exception as exc:  # what a user's client would see
                    outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
                with self._lock:
                    self.sent += 1
                    self.longest_s = max(self.longest_s, time.monotonic() - sent_at)
                    if outcome is None:
                        self.ok += 1
                        self.replies.append((reply.model_version, reply.outputs["embeddings"][0]))
                        self.served_by.append((reply.model_version, reply.headers.get("X-Served-By"), sent_at))
                    else:
                        self.failures.append(outcome)
            with self._lock:
                self.retried += client.retried

    def _cause(self, what: str) -> None:
        with self._lock:
            self.retry_causes[what] = self.retry_causes.get(what, 0) + 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        poll(lambda: self.ok >= 10, timeout_s=60)  # flowing before any fault
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def summary(self) -> str:
        causes = ", ".join(f"{k} x{v}" for k, v in sorted(self.retry_causes.items())) or "none"
        return (f"{self.sent} sent, {len(self.failures)} failed, {self.retried} retried by the client "
                f"(causes: {causes}), the slowest took {self.longest_s:.1f} s")  # fmt: skip

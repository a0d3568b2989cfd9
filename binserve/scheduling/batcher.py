"""The request batcher: one bounded queue and one thread per model, one future per request.

design: request threads call `submit(samples, deadline)` and wait on the returned future; the
batch thread sleeps on a condition while the queue is empty, so a lone request runs as soon as it
arrives (no fixed wait unless `max_wait_ms` asks for one), and while a batch runs, arrivals pile up
and the next batch takes all of them up to `max_batch_size` samples. The settings are one frozen
`BatchSettings` that the batch thread reads once per batch; `configure` swaps it whole. A request larger than a batch
is split into parts that run in consecutive batches and are re-joined in order. Expired requests
are dropped before they reach the model (DeadlineExceeded, 504); a full queue answers at once
(Overloaded, 429, with a Retry-After from the measured drain rate). An exception in a batch fails
exactly that batch's requests and the thread goes on. Nothing here imports Flask or torch: the
model is any `run_batch(samples) -> outputs` callable, which tests replace with a lambda. It is a
`contract.Scheduler`, as the continuous batcher is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from binserve.errors import (
    ClientGone,
    DeadlineExceeded,
    LimitExceeded,
    ModelFailure,
    NotReady,
    Overloaded,
    ServingError,
)
from binserve.scheduling.contract import (
    BatchObserver,
    BatchResult,
    BatchSettings,
    NullObserver,
    SchedulerThread,
    Tagged,
    notify,
)

log = logging.getLogger("binserve.batching")


@dataclass
class _Request:
    samples: Sequence
    deadline: float
    enqueued: float
    abandoned: Callable[[], bool] | None = None  # True once the client has gone away
    future: Future = field(default_factory=Future)
    claimed: bool = False  # the batch thread moved the future to running (or found it cancelled)
    parts_left: int = 0
    outputs: list = field(default_factory=list)
    batch_size: int = 0
    queue_s: float | None = None
    infer_s: float = 0.0
    tag: object = None


@dataclass
class _Part:
    request: _Request
    start: int  # index of the part's first sample in the request
    samples: Sequence
    lengths: list[int] | None = None  # per-sample token counts, for token models
    longest: int = 0


# which BatchStats counter each drop reason (also the metrics label) increments
_DROP_STATS = {"overloaded": "rejected", "deadline": "expired", "client_gone": "abandoned"}


@dataclass
class BatchStats:
    """Running totals of what this batcher ran (read by /models and the benchmarks)."""

    batches: int = 0
    samples: int = 0
    real_tokens: int = 0  # tokens of the samples themselves
    padded_tokens: int = 0  # rows x longest row, summed over batches
    expired: int = 0
    abandoned: int = 0
    rejected: int = 0
    failed_batches: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch_size"] = self.samples / self.batches if self.batches else 0.0
        d["padding_ratio"] = 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        return d


class Batcher(SchedulerThread):
    """Groups concurrent requests into batches for `run_batch` on one background thread."""

    def __init__(
        self,
        run_batch: Callable[[list], Sequence],
        settings: BatchSettings | None = None,
        *,
        max_queue_samples: int = 2048,
        sample_len: Callable[[object], int] | None = None,
        group_window: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Condition, float], object] | None = None,
        abandoned_after_s: float = 0.05,
        name: str = "model",
        observer: BatchObserver | None = None,
    ) -> None:
        if max_queue_samples < 1:
            raise ValueError("max_queue_samples must be at least 1")
        super().__init__(f"batcher-{name}")
        self.run_batch = run_batch
        self._settings = settings or BatchSettings()
        self.max_queue_samples = max_queue_samples
        # Token models: batches are bounded by padded tokens too, and formed from similar lengths.
        self.sample_len = sample_len
        # How far past the oldest request batch formation may look for similar lengths (default
        # 4 x max_batch_size): the oldest request is always in the next batch, so nothing waits
        # behind more than this.
        self.group_window = group_window
        self.totals = BatchStats()
        self.observer: BatchObserver = observer or NullObserver()
        self.clock = clock
        # How the batch thread waits `max_wait_ms` for a fuller batch (the condition is held, and
        # released while waiting); tests inject one that drives the clock they injected.
        self.wait = wait or (lambda cond, timeout_s: cond.wait(timeout_s))
        # Asking whether a client hung up costs a system call; requests that waited less than this
        # are run without asking (a disconnect that fast is rare, and the forward it wastes is short).
        self.abandoned_after_s = abandoned_after_s
        self.name = name
        self._parts: deque[_Part] = deque()
        self._queued_samples = 0
        self._drain_rate = 0.0  # samples per second, exponentially averaged

    # --- request side ---------------------------------------------------------------------
    @property
    def settings(self) -> BatchSettings:
        """The settings the next batch is formed by."""
        return self._settings

    def configure(self, settings: BatchSettings) -> None:
        """Form batches by `settings` from the next batch on; a waiting batch thread re-reads them."""
        with self._cond:
            self._settings = settings  # one assignment: the batch thread reads it once per batch
            self._cond.notify_all()

    @property
    def queued_samples(self) -> int:
        """Samples waiting for a batch (not counting the batch that runs now)."""
        return self._queued_samples

    def stats(self) -> dict:
        """Running totals for GET /models."""
        return self.totals.as_dict()

    def submit(self, samples: Sequence, deadline: float, abandoned: Callable[[], bool] | None = None) -> Future:
        """Queue a request of one or more samples; the future gives a `BatchResult` or raises.

        `abandoned`, if given, is asked just before the request would run; True (the client hung
        up) drops it like an expired one, so no forward pass is spent on an answer nobody reads.
        """
        n = len(samples)
        if n == 0:
            raise ValueError("a request needs at least one sample")
        if n > self.max_queue_samples:  # could never be queued: retrying cannot help, so not a 429
            raise LimitExceeded(
                f"a request of {n} samples is larger than model {self.name!r}'s queue "
                f"({self.max_queue_samples} samples, max_queue_samples); split it into several requests"
            )
        now = self.clock()
        req = _Request(samples=samples, deadline=deadline, enqueued=now, abandoned=abandoned)
        size = self._settings.max_batch_size
        parts = [_Part(req, i, samples[i : i + size]) for i in range(0, n, size)]
        if self.sample_len is not None:
            for part in parts:
                part.lengths = [self.sample_len(s) for s in part.samples]
                part.longest = max(part.lengths)
        req.parts_left = len(parts)
        req.outputs = [None] * n
        with self._cond:
            if self._closed:
                raise NotReady(f"model {self.name!r} is shutting down")
            if self._queued_samples + n > self.max_queue_samples:
                self._count_drop("overloaded")
                raise Overloaded(
                    f"model {self.name!r} has {self._queued_samples} samples queued (limit "
                    f"{self.max_queue_samples}); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            self._parts.extend(parts)
            self._queued_samples += n
            self._cond.notify()
        notify(self.observer.queue_depth, self._queued_samples)
        return req.future

    def retry_after_s(self) -> float:
        """Seconds until the queue has drained at the recently measured rate (at least 1)."""
        if self._drain_rate <= 0:
            return 1.0
        return max(1.0, round(self._queued_samples / self._drain_rate, 1))

    # --- batch side -----------------------------------------------------------------------
    def _take_batch(self) -> list[_Part] | None:
        """Wait for work and take the next batch; None once closed and drained."""
        with self._cond:
            while not self._parts:
                if self._closed:
                    return None
                self._cond.wait()
            # Optional: wait a little for a fuller batch (up to the preferred size), from the oldest request.
            while (s := self._settings).max_wait_ms and self._queued_samples < s.wait_for_samples and not self._closed:
                left = self._parts[0].request.enqueued + s.max_wait_s - self.clock()
                if left <= 0:
                    break
                self.wait(self._cond, left)
            s = self._settings  # this batch's settings, whatever configure() does meanwhile
            batch = self._form_batch(s) if self.sample_len is not None else self._fifo_batch(s)
            self._queued_samples -= sum(len(p.samples) for p in batch)
        notify(self.observer.queue_depth, self._queued_samples)
        return batch

    def _fifo_batch(self, s: BatchSettings) -> list[_Part]:
        # the first part always goes: a part split under a larger max_batch_size than today's still runs
        batch = [self._parts.popleft()]
        size = len(batch[0].samples)
        while self._parts and size + len(self._parts[0].samples) <= s.max_batch_size:
            part = self._parts.popleft()
            batch.append(part)
            size += len(part.samples)
        return batch

    def _form_batch(self, s: BatchSettings) -> list[_Part]:
        """The oldest part, plus the queued parts that add the least padding, within the budgets.

        Greedy: each step adds the part whose padded tokens minus real tokens (the waste it adds,
        counting the longer rows it forces on the others) is smallest. A part whose own padding
        would exceed its real tokens is left for a batch of rows like it.
        """
        window = [self._parts[i] for i in range(min(len(self._parts), self.group_window or 4 * s.max_batch_size))]
        head = window[0]
        rows, longest = len(head.samples), head.longest
        chosen = [0]
        free = [(i, len(p.samples), p.longest, sum(p.lengths)) for i, p in enumerate(window) if i]
        while free and rows < s.max_batch_size:
            best = None
            for k, (_, n, part_longest, real) in enumerate(free):
                r, m = rows + n, max(longest, part_longest)
                if r > s.max_batch_size or (s.max_batch_tokens and r * m > s.max_batch_tokens):
                    continue
                waste = r * m - rows * longest - real
                if waste <= real and (best is None or waste < best[0]):
                    best = (waste, k)
            if best is None:
                break
            i, n, part_longest, _ = free.pop(best[1])
            chosen.append(i)
            rows, longest = rows + n, max(longest, part_longest)
        taken = set(chosen)
        for _ in range(len(window)):
            self._parts.popleft()
        self._parts.extendleft(reversed([p for i, p in enumerate(window) if i not in taken]))
        return [window[i] for i in sorted(taken)]

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception:  # a bug of ours must fail this batch, never stop the thread
                log.exception("internal error in the batcher of %s", self.name)
                for part in batch:
                    self._fail(
                        part.request, ServingError("internal error in the batcher; the server log has the details")
                    )

    def _run(self, batch: list[_Part]) -> None:
        now = self.clock()
        live: list[_Part] = []
        for part in batch:
            req = part.request
            if not self._claim(req):
                continue  # cancelled by its request thread, or an earlier part already failed it
            if now > req.deadline:
                self._count_drop("deadline")
                self._fail(
                    req,
                    DeadlineExceeded(
                        f"the request waited {now - req.enqueued:.3f}s, past its deadline, before the model ran it"
                    ),
                )
                continue
            if req.abandoned is not None and now - req.enqueued >= self.abandoned_after_s and req.abandoned():
                self._count_drop("client_gone")
                self._fail(req, ClientGone("the client disconnected before its request ran"))
                continue
            live.append(part)
        if not live:
            return
        samples = [s for part in live for s in part.samples]
        started = self.clock()
        try:
            outputs = self.run_batch(samples)
            tag = None
            if isinstance(outputs, Tagged):
                outputs, tag = outputs.outputs, outputs.tag
            if len(outputs) != len(samples):  # our own words: safe to show the caller
                log.error("model %s returned %d outputs for %d inputs", self.name, len(outputs), len(samples))
                raise ModelFailure(f"model {self.name!r} returned {len(outputs)} outputs for {len(samples)} inputs")
        except ServingError as exc:
            self.totals.failed_batches += 1
            for part in live:
                self._fail(part.request, exc)
            return
        except Exception as exc:  # the model's failure fails this batch only
            log.exception("batch of %d samples failed on model %s", len(samples), self.name)
            self.totals.failed_batches += 1
            # The reply names the model, not the exception: its text can hold paths and internals.
            err = ModelFailure(
                f"model {self.name!r} failed on a batch of {len(samples)} samples ({type(exc).__name__}); "
                "the server log has the details"
            )
            for part in live:
                self._fail(part.request, err)
            return
        elapsed = self.clock() - started
        self._account(live, len(samples), elapsed)
        if elapsed > 0:
            rate = len(samples) / elapsed
            self._drain_rate = rate if self._drain_rate == 0 else 0.8 * self._drain_rate + 0.2 * rate
        offset = 0
        for part in live:
            req = part.request
            n = len(part.samples)
            req.outputs[part.start : part.start + n] = outputs[offset : offset + n]
            offset += n
            req.batch_size = max(req.batch_size, len(samples))
            if req.queue_s is None:
                req.queue_s = started - req.enqueued
            req.infer_s += elapsed
            req.tag = tag
            req.parts_left -= 1
            if req.parts_left == 0 and not req.future.done():
                req.future.set_result(BatchResult(req.outputs, req.batch_size, req.queue_s, req.infer_s, req.tag))

    def _account(self, live: list[_Part], n: int, seconds: float) -> None:
        st = self.totals
        st.batches += 1
        st.samples += n
        real = padded = 0
        if self.sample_len is not None:
            real = sum(sum(p.lengths) for p in live)
            padded = n * max(p.longest for p in live)
            st.real_tokens += real
            st.padded_tokens += padded
        notify(self.observer.batch, n, real, padded, seconds)

    def _count_drop(self, reason: str) -> None:
        """A request refused (overloaded) or dropped before running (deadline, client_gone)."""
        field = _DROP_STATS[reason]
        setattr(self.totals, field, getattr(self.totals, field) + 1)
        notify(self.observer.dropped, reason)

    @staticmethod
    def _claim(req: _Request) -> bool:
        """Move the request's future to running, once; False when it was cancelled or is done.

        A request thread may cancel its future (its deadline passed) at any moment; a running
        future can no longer be cancelled, so after this only the batch thread changes it and
        setting its result or exception cannot race with a cancel.
        """
        if not req.claimed:
            req.claimed = True
            return req.future.set_running_or_notify_cancel()
        return not req.future.done()

    @classmethod
    def _fail(cls, req: _Request, exc: BaseException) -> None:
        if cls._claim(req):
            req.future.set_exception(exc)

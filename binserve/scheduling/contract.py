"""The contract between a model's scheduler and everything that drives or watches it.

design: the model manager, `GET /models` and the metrics meet a scheduler - the request batcher
(`batcher.Batcher`) or the continuous batcher of generation (`continuous.ContinuousBatcher`) -
only through `Scheduler`: submit work, read its settings, queue and stats, apply new settings,
close. Settings cross this seam as one frozen `BatchSettings`, swapped in one assignment by
`configure` and read once per batch (or step) by the scheduler's own thread, so no other thread
ever writes a scheduler's fields (TEI's router takes typed commands on a channel, the same idea).
What a scheduler reports goes to an observer typed by `BatchObserver` / `GenerationObserver`,
every call behind one guard (`notify`): metrics must never break serving. Nothing here imports
torch or Flask, so the HTTP layer can name these types.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields
from typing import Protocol, runtime_checkable

from binserve.config import ServerConfig
from binserve.scheduling import sequences

log = logging.getLogger("binserve.scheduling")

#: the bounds of each batching setting, inclusive: the server's settings' (a version's binserve.json
#: is held to them too)
BATCH_BOUNDS: dict[str, tuple[float, float]] = {
    f.name: (f.metadata["ge"], f.metadata["le"])
    for f in fields(ServerConfig)
    if f.name in ("max_batch_size", "max_batch_tokens", "max_wait_ms", "preferred_batch_size")
}


@dataclass(frozen=True)
class BatchSettings:
    """How a scheduler forms batches; replaced whole (`Scheduler.configure`), never edited."""

    #: samples per forward pass (the request batcher); sequences running at once (generation)
    max_batch_size: int = 32
    #: padded tokens (rows x longest row) per batch of token rows; the KV cache's tokens (rows x the
    #: longest reservation, generation: kvcache.SlotCache); None: no token bound (array models)
    max_batch_tokens: int | None = None
    #: how long the batch thread may wait for a fuller batch after the first request; 0: not at all
    max_wait_ms: float = 0.0
    #: with max_wait_ms, the queued samples that end the wait early; 0: max_batch_size
    preferred_batch_size: int = 0

    def __post_init__(self) -> None:
        for name, (low, high) in BATCH_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name == "max_batch_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")

    @property
    def wait_for_samples(self) -> int:
        """How many queued samples end a `max_wait_ms` wait."""
        return min(self.preferred_batch_size or self.max_batch_size, self.max_batch_size)

    @property
    def max_wait_s(self) -> float:
        """`max_wait_ms` in seconds."""
        return self.max_wait_ms / 1000.0

    def as_dict(self) -> dict:
        """The settings as GET /models shows them."""
        return asdict(self)


@dataclass
class Tagged:
    """What a batch function may return instead of a bare list: outputs plus a tag for every request
    in the batch (binserve tags them with the model version that computed them)."""

    outputs: Sequence
    tag: object


@dataclass
class BatchResult:
    """What a request's future resolves to: one output per sample, and how it was served."""

    outputs: list
    batch_size: int  # samples in the largest batch this request was part of
    queue_s: float  # from submit to the start of its (first) batch
    infer_s: float  # time inside the model, summed over its parts
    tag: object = None  # the Tagged.tag of its (last) batch


class BatchObserver(Protocol):
    """What the request batcher reports (binserve's is `observability.metrics.BatchMetrics`)."""

    def batch(self, samples: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        """A batch ran."""

    def queue_depth(self, samples: int) -> None:
        """Samples now waiting."""

    def dropped(self, reason: str) -> None:
        """A request was refused (overloaded) or left without running (deadline, client_gone)."""


class GenerationObserver(Protocol):
    """What the continuous batcher reports (binserve's is `observability.metrics.GenerationMetrics`)."""

    def token(self, ttft_s: float | None, itl_s: float | None) -> None:
        """A token was generated: its time since arrival if first, else since the previous one."""

    def counts(self, running: int, waiting: int) -> None:
        """Sequences running and waiting now."""

    def dropped(self, reason: str) -> None:
        """A sequence was refused (overloaded)."""


class NullObserver:
    """Observes nothing: the default of both schedulers."""

    def batch(self, samples: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        pass

    def queue_depth(self, samples: int) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def token(self, ttft_s: float | None, itl_s: float | None) -> None:
        pass

    def counts(self, running: int, waiting: int) -> None:
        pass


def notify(call: Callable[..., None], *args) -> None:
    """Call an observer's method; its failure is logged and goes no further (the one guard)."""
    try:
        call(*args)
    except Exception:
        log.exception("metrics observer failed in %s", getattr(call, "__qualname__", call))


class SchedulerThread:
    """What both schedulers share: one condition, a closed flag, and one thread running `_loop`,
    which returns once the scheduler is closed and what it accepted is done."""

    def __init__(self, thread_name: str) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name

    def start(self):
        """Start the scheduler's thread (idempotent); returns the scheduler."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking work, finish what was accepted, and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        raise NotImplementedError


@runtime_checkable
class Scheduler(Protocol):
    """One model's scheduler as the manager, GET /models and the HTTP layer use it."""

    name: str

    @property
    def settings(self) -> BatchSettings:
        """The settings the next batch (or step) is formed by."""

    @property
    def queued_samples(self) -> int:
        """Samples (sequences) waiting, not counting what runs now."""

    def configure(self, settings: BatchSettings) -> None:
        """Form batches by `settings` from the next batch on (one assignment, any thread)."""

    def start(self) -> Scheduler:
        """Start the scheduler's thread; returns the scheduler."""

    def submit(self, samples: Sequence, deadline: float, abandoned: Callable[[], bool] | None = None) -> Future:
        """Queue one request's samples; the future resolves to a `BatchResult` or raises a ServingError."""

    def stats(self) -> dict:
        """Running totals for GET /models."""

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking work, finish what was accepted, and stop the thread."""


@runtime_checkable
class GenerationScheduler(Scheduler, Protocol):
    """A generative model's scheduler: whole generations through `submit`, streams one by one."""

    def submit_sequence(self, seq: sequences.Sequence) -> sequences.Sequence:
        """Queue one sequence (413 if it could never fit, 429 when the queue is full); read its events."""

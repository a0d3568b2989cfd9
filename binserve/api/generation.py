"""One generation request as every generation route runs it (OpenAI's completions and chat, the
seed's /generate and /chat): admission of the prompt's tokens, the response cache for greedy or
seeded requests, the sequence on the model's continuous batcher, and its tokens charged to the
caller's key as they come, whether the route waits for the whole text or streams it.

design: the routes differ only in their request and reply shapes; what a sequence costs, how it
is cancelled (the client left, the stream closed) and what the cache keeps are decided here once.
"""

from __future__ import annotations

import dataclasses
import time

from flask import request

from binserve.api.pipeline import Pipeline, client_gone_check
from binserve.observability import metrics
from binserve.scheduling.sequences import SamplingParams, Sequence
from binserve.serving.contract import ServedModel

#: what a stream of server-sent events is sent with: not cached, not buffered by a proxy (nginx)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# generated tokens are charged to the key's quota in steps of this many (and the rest at the end)
_CHARGE_EVERY = 16


class Generation:
    """A prompt admitted for a model: look it up in the cache, or run it (`wait` or `batches`)."""

    def __init__(self, pipeline: Pipeline, loaded: ServedModel, ids: list[int], params: SamplingParams) -> None:
        pipeline.admit_tokens(len(ids))  # the prompt; generated tokens are charged as they come
        self.pipeline, self.loaded, self.ids, self.params = pipeline, loaded, ids, params
        self.charge = pipeline.charger()
        self.deadline = pipeline.deadline()
        self.version = loaded.adapter.version
        self.key = None
        self.seq: Sequence | None = None
        self.started = time.monotonic()

    def cached(self, kind: str, stream: bool) -> dict | None:
        """A whole greedy or seeded request's earlier answer ({text, finish_reason,
        completion_tokens}), charged as if generated; None: run it (streams always run)."""
        deterministic = self.params.temperature == 0 or self.params.seed is not None
        if stream or not deterministic or self.params.logprobs is not None:  # the cache keeps no logprobs
            return None
        options = dataclasses.asdict(self.params)
        self.key, done = self.pipeline.cache_lookup(self.loaded, [self.ids], options, kind, self.version)
        if done is not None:
            self.charge(int(done["completion_tokens"]))
        return done

    def start(self) -> Sequence:
        self.seq = Sequence(self.ids, self.params, self.deadline, client_gone_check(request.environ))
        self.started = time.monotonic()
        return self.loaded.scheduler.submit_sequence(self.seq)

    def wait(self) -> dict:
        """Run to the end; {text, finish_reason, completion_tokens} (kept by the cache when it may)."""
        seq = self.start()
        try:
            for _ in seq.stream(self._left()):
                if len(seq.output) % _CHARGE_EVERY == 0:
                    self.charge(len(seq.output))
        finally:
            seq.cancel()
            self._ended(seq)
        done = {"text": seq.text, "finish_reason": seq.finish_reason, "completion_tokens": len(seq.output)}
        # kept only when no reload landed meanwhile
        self.pipeline.cache_store(self.key, self.loaded, self.version, self.loaded.adapter.version, done)
        return done

    def batches(self):
        """(token id, text delta) as they come, a list per batch of tokens that arrived together
        (one write for all of them); the id is None for text held back until the end (a possible
        stop string), and the n-th event with an id is `seq.output[n]` (and `seq.logprobs[n]`).
        Closing it (the client left) stops the sequence at its next step. Raises the sequence's
        ServingError, which a streaming route sends inside the stream."""
        seq = self.start() if self.seq is None else self.seq
        try:
            for events in seq.stream_batches(self._left()):
                self.charge(len(seq.output))
                yield [(token, delta) for _, token, delta in events]
        finally:
            seq.cancel()
            self._ended(seq)

    def _ended(self, seq: Sequence) -> None:
        """Charge what it made before it stopped; count it for /stats."""
        self.charge(len(seq.output))
        metrics.GENERATION_REQUESTS.labels(self.loaded.name).inc()
        metrics.GENERATION_SECONDS.labels(self.loaded.name).inc(self.elapsed_s)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

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
    """A prompt admitted for a model, with `n` choices: look it up in the cache, or run it (`wait`
    for every choice, or `batches` of one). The choices are separate sequences that share the
    prompt's prefill in the batcher; choice i of a seeded request samples with seed + i."""

    def __init__(
        self, pipeline: Pipeline, loaded: ServedModel, ids: list[int], params: SamplingParams, n: int = 1
    ) -> None:
        pipeline.admit_tokens(len(ids))  # the prompt, once; generated tokens are charged as they come
        self.pipeline, self.loaded, self.ids, self.params, self.n = pipeline, loaded, ids, params, n
        self._charge_upto = pipeline.charger()
        self.deadline = pipeline.deadline()
        self.version = loaded.adapter.version
        self.key = None
        self.seqs: list[Sequence] = []
        self.started = time.monotonic()

    @property
    def seq(self) -> Sequence:
        """The first choice's sequence."""
        return self.seqs[0]

    def charge(self, extra: int = 0) -> None:
        """Charge every choice's tokens made so far (and `extra`, a cache hit's) not charged yet."""
        self._charge_upto(extra + sum(len(s.output) for s in self.seqs))

    def cached(self, kind: str, stream: bool) -> dict | None:
        """A whole greedy or seeded request's earlier answer ({text, finish_reason,
        completion_tokens}), charged as if generated; None: run it (streams always run)."""
        deterministic = self.params.temperature == 0 or self.params.seed is not None
        if stream or self.n > 1 or not deterministic or self.params.logprobs is not None:  # kept: one text
            return None
        options = dataclasses.asdict(self.params)
        self.key, done = self.pipeline.cache_lookup(self.loaded, [self.ids], options, kind, self.version)
        if done is not None:
            self.charge(int(done["completion_tokens"]))
        return done

    def start(self) -> list[Sequence]:
        """Queue every choice (429 for all when the queue cannot take them all)."""
        gone = client_gone_check(request.environ)
        self.started = time.monotonic()
        try:
            for i in range(self.n):
                p = self.params
                if p.seed is not None and i:
                    p = dataclasses.replace(p, seed=p.seed + i)
                self.seqs.append(self.loaded.scheduler.submit_sequence(Sequence(self.ids, p, self.deadline, gone)))
        except BaseException:
            for seq in self.seqs:
                seq.cancel()
            raise
        return self.seqs

    def wait(self) -> list[dict]:
        """Run every choice to the end; {text, finish_reason, completion_tokens} each (one choice's
        kept by the cache when it may)."""
        seqs = self.start()
        try:
            for seq in seqs:
                for _ in seq.stream(self._left()):
                    if len(seq.output) % _CHARGE_EVERY == 0:
                        self.charge()
        finally:
            self._ended()
        dones = [{"text": s.text, "finish_reason": s.finish_reason, "completion_tokens": len(s.output)} for s in seqs]
        # kept only when no reload landed meanwhile
        self.pipeline.cache_store(self.key, self.loaded, self.version, self.loaded.adapter.version, dones[0])
        return dones

    def batches(self, choice: int = 0):
        """(token id, text delta) of one choice as they come, a list per batch of tokens that
        arrived together (one write for all of them); the id is None for text held back until the
        end (a possible stop string), and the k-th event with an id is `output[k]` (and
        `logprobs[k]`) of the choice's sequence. Closing it (the client left) stops every choice at
        its next step. Raises the sequence's ServingError, which a streaming route sends inside
        the stream."""
        seq = (self.seqs or self.start())[choice]
        done = False
        try:
            for events in seq.stream_batches(self._left()):
                self.charge()
                yield [(token, delta) for _, token, delta in events]
            done = True
        finally:
            if not done or choice == self.n - 1:
                self._ended()

    def _ended(self) -> None:
        """Stop every choice, charge what they made, count the request for /stats."""
        for seq in self.seqs:
            seq.cancel()
        self.charge()
        metrics.GENERATION_REQUESTS.labels(self.loaded.name).inc()
        metrics.GENERATION_SECONDS.labels(self.loaded.name).inc(self.elapsed_s)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

"""What every generation backend shares: the waiting queue, whole-request futures, and turning the
tokens an engine produces into a sequence's stream (text deltas, stop strings, EOS, length,
deadline, a client gone).

design: a backend (binserve's own loop, `continuous.ContinuousBatcher`, or an engine such as
`openvino_genai.OpenVINOGenerator`) decides which sequences run and produces their tokens; it
hands each token to `_emit`, which is the one place that decides what the consumer sees and when a
sequence ends. So every backend streams the same text for the same tokens, holds back the same
stop strings and ends for the same reasons, and the HTTP layer cannot tell them apart. A backend
says how a sequence reserves room (`_reservation`, `_check_fits`) and prepares it (`_prepare`).
Nothing here imports torch or Flask.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from binserve.errors import ClientGone, DeadlineExceeded, LimitExceeded, NotReady, Overloaded
from binserve.scheduling.contract import (
    BatchResult,
    BatchSettings,
    GenerationObserver,
    NullObserver,
    SchedulerThread,
    notify,
)
from binserve.scheduling.sequences import Sequence


class GenerationStreams(SchedulerThread):
    """The request side and the token side of a generation backend; the backend's thread runs
    `_loop` and calls `_emit` for every token it produced."""

    #: what GET /models, /health and /stats report as the model's backend
    backend_type = "binserve-loop"

    def __init__(
        self,
        tokenizer,
        settings: BatchSettings,
        *,
        max_waiting: int = 256,
        eos_ids: tuple[int, ...] = (),
        name: str = "model",
        observer: GenerationObserver | None = None,
        tag: object = None,
        thread_name: str | None = None,
    ) -> None:
        super().__init__(thread_name or f"binserve-generate-{name}")
        self.tokenizer = tokenizer
        self._settings = _checked(settings)
        self.max_waiting = max_waiting
        self.eos_ids = set(eos_ids)
        self.name = name
        self.observer: GenerationObserver = observer or NullObserver()
        self.tag = tag  # what results are tagged with (the model version)
        self._waiting: deque[Sequence] = deque()
        self._reserved = 0
        self.sequences = 0  # admitted so far
        self.generated = 0  # tokens so far

    # --- request side ------------------------------------------------------------------------
    @property
    def settings(self) -> BatchSettings:
        """The bounds the next step admits sequences by."""
        return self._settings

    def configure(self, settings: BatchSettings) -> None:
        """Admit by `settings` from the next step on (running sequences keep their reservations)."""
        self._settings = _checked(settings)  # one assignment: the loop reads it once per step

    @property
    def queued_samples(self) -> int:
        """Sequences waiting to start."""
        return len(self._waiting)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences now."""
        raise NotImplementedError

    def stats(self) -> dict:
        """What GET /models shows of every backend; a backend adds its own counters."""
        running, waiting = self.counts()
        return {
            "backend_type": self.backend_type,
            "sequences": self.sequences,
            "generated_tokens": self.generated,
            "running": running,
            "waiting": waiting,
            "reserved_cache_tokens": self._reserved,
        }

    def _reservation(self, seq: Sequence) -> int:
        return len(seq.prompt) + seq.params.max_new_tokens

    def _check_fits(self, seq: Sequence, s: BatchSettings) -> None:
        if self._reservation(seq) > s.max_batch_tokens:
            raise LimitExceeded(
                f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.params.max_new_tokens}) is over this "
                f"model's {s.max_batch_tokens}-token cache"
            )

    def _prepare(self, seq: Sequence) -> None:
        """Before a sequence is queued (under the lock): what the backend needs of it (a seeded
        generator); raises a ServingError for what the backend cannot do."""

    def submit_sequence(self, seq: Sequence) -> Sequence:
        """Queue a sequence; 413 if it could never fit the cache, 429 when the queue is full."""
        self._check_fits(seq, self._settings)
        with self._cond:
            if self._closed:
                raise NotReady(f"model {self.name!r} is shutting down")
            if len(self._waiting) >= self.max_waiting:
                notify(self.observer.dropped, "overloaded")
                raise Overloaded(
                    f"model {self.name!r} has {len(self._waiting)} sequences waiting (limit {self.max_waiting}); "
                    "retry later",
                    retry_after_s=1.0,
                )
            self._prepare(seq)
            self._waiting.append(seq)
            self._cond.notify()
        self._observe_counts()
        return seq

    def submit(self, samples: list, deadline: float, abandoned=None) -> Future:
        """The Batcher interface for whole (non-streamed) generations: samples are (prompt, params);
        the future gets a BatchResult-like object with one {"output_ids"} per sample."""
        if len(samples) > self.max_waiting:  # could never be queued at once: 413, not a 429 to retry
            raise LimitExceeded(
                f"{len(samples)} prompts in one request; model {self.name!r} queues at most {self.max_waiting}"
            )
        future: Future = Future()
        started = time.monotonic()
        seqs = [Sequence(list(p), params, deadline, abandoned) for p, params in samples]
        left = [len(seqs)]
        lock = threading.Lock()

        def ended(_seq: Sequence) -> None:  # on the generation thread, as each sequence ends
            with lock:
                left[0] -= 1
                if left[0] or future.done():
                    return  # more to come, or the request gave up (cancelled its future)
            failed = next((s.error for s in seqs if s.error is not None), None)
            outputs = [{"output_ids": s.output, "finish_reason": s.finish_reason} for s in seqs]
            queue_s = max(0.0, min((s.first_token_at or started) for s in seqs) - started)
            try:
                if failed is not None:
                    future.set_exception(failed)
                else:
                    elapsed = time.monotonic() - started - queue_s
                    future.set_result(BatchResult(outputs, len(seqs), queue_s, elapsed, self.tag))
            except InvalidStateError:
                pass  # cancelled by its request in the meantime

        # a request that gives up (its deadline passed) cancels the future: stop its sequences too
        future.add_done_callback(lambda f: [s.cancel() for s in seqs] if f.cancelled() else None)
        try:
            for s in seqs:
                s.on_end = ended
                self.submit_sequence(s)
        except Exception:
            for s in seqs:
                s.cancel()  # the ones already queued end at their first step
            raise
        return future

    # --- token side (the backend's thread) -----------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        with self._cond:
            self._reserved -= self._reservation(seq)

    def _gone(self, seq: Sequence) -> bool:
        now = time.monotonic()
        # asking the socket costs a system call: at most every 50 ms per sequence, not every token
        ask = seq.abandoned is not None and now - seq.checked_at >= 0.05
        if ask:
            seq.checked_at = now
        if seq.cancelled or (ask and seq.abandoned()):
            seq.finish_reason = "cancelled"
            seq.end(("error", ClientGone("the client went away")))
            return True
        if now > seq.deadline:
            seq.finish_reason = "deadline"
            seq.end(("error", DeadlineExceeded("the request's deadline passed while it was generating")))
            return True
        return False

    def _emit(self, seq: Sequence, token: int, logprob: Callable[[int], tuple] | None = None) -> None:
        """Record a produced token (with its logprobs when asked: `logprob(token)` gives the entry)
        and stream its text; decide whether the sequence is finished."""
        now = time.monotonic()
        notify(
            self.observer.token,
            now - seq.enqueued if seq.first_token_at is None else None,
            now - seq.last_token_at if seq.last_token_at is not None else None,
        )
        self.generated += 1
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        if self._gone(seq):
            return
        if token in self.eos_ids:
            self._send_text(seq, None, self.tokenizer.decode(seq.output, skip_special_tokens=True))  # held back
            self._finish(seq, "stop")
            return
        seq.output.append(token)
        if seq.params.logprobs is not None and logprob is not None:  # before its event: readers find it
            seq.logprobs.append(logprob(token))
        before = len(seq.decoded)
        full = self._detokenize(seq)
        # a stop string can only end in the new text: search from where it could start, not the whole text
        start = max(0, before - max((len(s) for s in seq.params.stop), default=0))
        stop_at = min((i for i in (full.find(s, start) for s in seq.params.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self._send_text(seq, token, full[:stop_at])
            self._finish(seq, "stop")
            return
        # hold back what could still become a stop sequence, and a split UTF-8 character
        hold = max((len(s) - 1 for s in seq.params.stop), default=0)
        safe = full[: len(full) - hold] if hold else full
        if safe.endswith("\ufffd"):
            safe = safe[:-1]
        self._send_text(seq, token, safe)
        if len(seq.output) >= seq.params.max_new_tokens:
            self._send_text(seq, None, self.tokenizer.decode(seq.output, skip_special_tokens=True))  # held back
            self._finish(seq, "length")

    def _detokenize(self, seq: Sequence) -> str:
        """The sequence's text with its new token, decoding only the last few tokens (as TGI and vLLM
        do): a few tokens before the new ones give the decoder its context (spaces, merged bytes),
        and a token that ends inside a UTF-8 character waits for the next one."""
        decode = self.tokenizer.decode
        context = decode(seq.output[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        text = decode(seq.output[seq.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(context) and not text.endswith("\ufffd"):
            seq.decoded += text[len(context) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.output)
        return seq.decoded

    def _send_text(self, seq: Sequence, token: int | None, text: str) -> None:
        delta = text[len(seq.text) :] if text.startswith(seq.text) else ""
        seq.text += delta
        if token is not None or delta:
            seq.events.put(("token", token, delta))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.end(("done", reason))

    def _observe_counts(self) -> None:
        running, waiting = self.counts()
        notify(self.observer.counts, running, waiting)


def _checked(settings: BatchSettings) -> BatchSettings:
    if settings.max_batch_tokens is None:
        raise ValueError("a generation backend needs max_batch_tokens (the KV-cache tokens it may reserve)")
    return settings

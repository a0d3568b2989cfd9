"""One generation request as the generation loop and its consumer (an HTTP route) share it.

design: a `Sequence` is the one object that crosses between the request thread and the continuous
batcher's thread: the loop appends tokens and puts events on its queue, the route reads them
(`stream`, `stream_batches`) and may `cancel` it. `SamplingParams` says how it is generated.
Nothing here imports torch: the HTTP layer builds sequences without loading the model's stack.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field

from binserve.errors import DeadlineExceeded

log = logging.getLogger("binserve.generation")


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (deterministic)
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Hugging Face's: every token of the prompt and output so far has its logit divided by this
    #: (multiplied when negative); 1: off
    repetition_penalty: float = 1.0
    #: OpenAI's: each token generated so far loses presence (once) + frequency x its count; 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: the log-probability of each generated token and of this many most likely alternatives
    #: (log-softmax of the model's own logits, before temperature and penalties); None: none
    logprobs: int | None = None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class Sequence:
    """One generation request: its prompt, settings, progress and the events its consumer reads.

    Events on `events`: ("token", token_id, text_delta) per generated token, then exactly one of
    ("done", finish_reason) or ("error", ServingError).
    """

    prompt: list[int]
    params: SamplingParams
    deadline: float
    abandoned: object = None  # callable: True when the client hung up
    events: queue.Queue = field(default_factory=queue.Queue)
    output: list[int] = field(default_factory=list)
    text: str = ""  # the text streamed so far (stop sequences held back until they cannot match)
    finish_reason: str | None = None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    checked_at: float = 0.0  # when the client was last asked whether it is still there
    first_token_at: float | None = None
    last_token_at: float | None = None
    generator: object = None  # a torch.Generator, made by the loop for seeded sampling
    #: called (on the generation thread) once the sequence has ended, after its last event
    on_end: object = None
    error: Exception | None = None
    cache_len: int = 0  # tokens in the cache (the next token's position and column)
    slot: int = -1  # its row of the cache, while it runs
    reused: int = 0  # prompt tokens whose KV came from the prefix store
    follows: object = None  # the sequence with the same prompt whose prefill it will copy
    #: per token of `output` when `params.logprobs` is set: (its logprob, [(alternative, logprob)])
    logprobs: list = field(default_factory=list)
    decoded: str = ""  # the whole text of `output` decoded so far (complete characters only)
    prefix_offset: int = 0  # incremental detokenizing: tokens before `read_offset` kept as context
    read_offset: int = 0

    def cancel(self) -> None:
        """Stop at the next step (the client went away, or no longer wants it)."""
        self.cancelled = True

    def end(self, event: tuple) -> None:
        """The last event: ("done", finish_reason) or ("error", ServingError)."""
        if event[0] == "error":
            self.error = event[1]
        self.events.put(event)
        if self.on_end is not None:
            try:
                self.on_end(self)
            except Exception:  # a consumer's callback must never stop the generation loop
                log.exception("a sequence's end callback failed")

    def stream(self, timeout_s: float):
        """Yield ("token", id, delta) events until the end; raises the sequence's error, if any."""
        for events in self.stream_batches(timeout_s):
            yield from events

    def stream_batches(self, timeout_s: float):
        """Like `stream`, but each yield is every token event that has arrived since the last one:
        a consumer that was busy writing catches up in one write rather than one per token."""
        while True:
            try:
                events = [self.events.get(timeout=timeout_s)]
            except queue.Empty:
                self.cancel()
                raise DeadlineExceeded("no token arrived within the request's deadline") from None
            while True:
                try:
                    events.append(self.events.get_nowait())
                except queue.Empty:
                    break
            tokens = [e for e in events if e[0] == "token"]
            last = events[-1]
            if tokens:
                yield tokens
            if last[0] == "error":
                raise last[1]
            if last[0] == "done":
                return

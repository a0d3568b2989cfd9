"""Continuous (iteration-level) batching for causal language models: one forward per step for every
running sequence; new sequences join between steps, finished ones leave at once.

design: one generation thread per model (its "batch thread"). Each step it (1) admits waiting
sequences while the running set and the reserved KV-cache tokens stay under their bounds, running
each new prompt's prefill alone (batch 1, unpadded: its first token is exactly what
`model.generate` gives) and merging its cache into the batch; (2) runs one decode forward for all
running sequences; (3) samples each row with its own settings and generator, streams the token to
its consumer, and drops rows that finished, were cancelled or passed their deadline.

The KV cache is binserve's own batched layout, not a cache class that grows per sequence: per
layer one key and one value tensor of [running, kv_heads, T, head_dim], left-padded, with a [running,
T] attention mask and per-row position ids. A decode step hands it to the model as a `DynamicCache`
built around those tensors (no copy) and takes the grown tensors back; a joining sequence pads
once; leaving rows are dropped with one `index_select` and all-padding leading columns trimmed. This
keeps a decode step one batched matmul per layer, which per-sequence caches would not give
without re-padding every step.

Bounds, from its `BatchSettings` (read once per step; `configure` swaps them whole): at most
`max_batch_size` sequences run, their prompt + max_new_tokens reservations stay under
`max_batch_tokens` (the KV-cache tokens), and at most `max_waiting` wait; past that, `submit`
answers 429 with Retry-After. A prompt whose reservation alone exceeds the cache is 413. It is a
`contract.Scheduler`, as the request batcher is. No Flask here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from binserve.errors import ClientGone, DeadlineExceeded, LimitExceeded, ModelFailure, NotReady, Overloaded
from binserve.scheduling.contract import (
    BatchResult,
    BatchSettings,
    GenerationObserver,
    NullObserver,
    SchedulerThread,
    notify,
)
from binserve.scheduling.sequences import Sequence

#: what a continuous batcher runs with unless told: 16 sequences, 32 Ki cache tokens
DEFAULT_SETTINGS = BatchSettings(max_batch_size=16, max_batch_tokens=32768)

log = logging.getLogger("binserve.generation")


class ContinuousBatcher(SchedulerThread):
    """The generation loop of one causal LM; `submit` a prompt, read its `Sequence.events`."""

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        settings: BatchSettings = DEFAULT_SETTINGS,
        *,
        max_waiting: int = 256,
        eos_ids: tuple[int, ...] = (),
        name: str = "model",
        observer: GenerationObserver | None = None,
        autocast: torch.dtype | None = None,
        step_threads=None,
        tag: object = None,
    ) -> None:
        super().__init__(f"binserve-generate-{name}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self._settings = _checked(settings)
        self.max_waiting = max_waiting
        self.eos_ids = set(eos_ids)
        self.name = name
        self.observer: GenerationObserver = observer or NullObserver()
        self.autocast = autocast
        self.step_threads = step_threads  # context manager giving the step its cores (runtime.batch_threads)
        self.tag = tag  # what results are tagged with (the model version)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._joining: list[Sequence] = []  # admitted this step, not merged yet
        self._reserved = 0
        # the batched cache: per layer [keys, values] of [B, kv_heads, T, head_dim]; mask [B, T]
        self._kv: list[list[torch.Tensor]] = []
        self._mask: torch.Tensor | None = None
        self.steps = 0
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

    def stats(self) -> dict:
        """What GET /models shows of the generation loop."""
        running, waiting = self.counts()
        return {
            "steps": self.steps,
            "sequences": self.sequences,
            "generated_tokens": self.generated,
            "running": running,
            "waiting": waiting,
            "reserved_cache_tokens": self._reserved,
        }

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences now."""
        return len(self._running), len(self._waiting)

    def _reservation(self, seq: Sequence) -> int:
        return len(seq.prompt) + seq.params.max_new_tokens

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
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
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

    # --- the generation thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running:
                    if self._closed:
                        return
                    self._cond.wait()
            try:
                if self.step_threads is not None:
                    with self.step_threads():
                        self._step()
                else:
                    self._step()
            except Exception as exc:  # a failing step fails its sequences, never the thread
                log.exception("model %s: generation step failed", self.name)
                err = ModelFailure(f"model {self.name!r} failed while generating ({type(exc).__name__})")
                for seq in {id(s): s for s in self._running + self._joining}.values():
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.end(("error", err))
                with self._cond:
                    self._running, self._joining, self._kv, self._mask, self._reserved = [], [], [], None, 0
            self._observe_counts()

    def _check_fits(self, seq: Sequence, s: BatchSettings) -> None:
        if self._reservation(seq) > s.max_batch_tokens:
            raise LimitExceeded(
                f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.params.max_new_tokens}) is over this "
                f"model's {s.max_batch_tokens}-token cache"
            )

    def _admit(self) -> list[Sequence]:
        admitted = []
        s = self._settings  # this step's bounds
        with self._cond:
            while self._waiting and len(self._running) + len(admitted) < s.max_batch_size:
                seq = self._waiting[0]
                try:
                    self._check_fits(seq, s)  # queued under larger settings than today's: it never will
                except LimitExceeded as exc:
                    self._waiting.popleft()
                    seq.finish_reason = "error"
                    seq.end(("error", exc))
                    continue
                if self._reserved + self._reservation(seq) > s.max_batch_tokens:
                    break
                self._waiting.popleft()
                self._reserved += self._reservation(seq)
                self.sequences += 1
                admitted.append(seq)
        return admitted

    def _forward(self, **kwargs):
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    return self.model(**kwargs)
            return self.model(**kwargs)

    def _step(self) -> None:
        self._joining = self._admit()
        joining = []
        for seq in self._joining:
            if self._gone(seq):
                self._release(seq)
            else:
                joining.append(seq)
        if joining:
            self._join(joining)
        self._joining = []
        if not self._running:
            return
        live = [s for s in self._running if s.finish_reason is None]
        if len(live) != len(self._running):
            self._drop_finished()
        if not self._running:
            return
        last = torch.tensor([[s.output[-1]] for s in self._running], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
        positions = torch.tensor([[s.cache_len] for s in self._running], device=self.device)
        cache = self._wrap(self._kv)
        out = self._forward(
            input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        self._kv = [[layer.keys, layer.values] for layer in cache.layers]
        self._mask = mask
        self.steps += 1
        logits = out.logits[:, -1].float()
        greedy = logits.argmax(-1).tolist()  # one op for every greedy row, rather than one per row
        for i, seq in enumerate(self._running):
            seq.cache_len += 1
            if seq.params.penalized:  # its own row, penalized (a copy: the batch's logits are inference tensors)
                self._emit(seq, self._sample(penalize(logits[i], seq), seq), logits[i])
            else:
                token = greedy[i] if seq.params.temperature == 0 else self._sample(logits[i], seq)
                self._emit(seq, token, logits[i])
        self._drop_finished()

    def _wrap(self, kv: list[list[torch.Tensor]]) -> DynamicCache:
        """A DynamicCache around the batched tensors, without copying them: DynamicCache's own
        constructor appends them to empty tensors (a copy of the whole cache every step)."""
        cache = DynamicCache(config=self.model.config)
        if len(cache.layers) != len(kv):
            return DynamicCache(ddp_cache_data=[tuple(x) for x in kv], config=self.model.config)  # other layouts
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        return cache

    def _join(self, seqs: list[Sequence]) -> None:
        """Prefill the newcomers of a step in one forward and add them to the batch, each with its
        first token. Sequences with the same prompt (a request's n choices, or any that ask the
        same) share one row of that forward."""
        rows: dict[tuple, int] = {}
        for seq in seqs:
            rows.setdefault(tuple(seq.prompt), len(rows))
        kv, mask, logits = self._prefill([list(p) for p in rows])
        index = [rows[tuple(seq.prompt)] for seq in seqs]
        if index != list(range(len(rows))):  # a row per sequence (copies for the shared prompts)
            pick = torch.tensor(index, device=self.device)
            kv = [[k.index_select(0, pick), v.index_select(0, pick)] for k, v in kv]
            mask = mask.index_select(0, pick)
        self._merge(seqs, kv, mask)
        for seq, r in zip(seqs, index, strict=True):
            seq.cache_len = len(seq.prompt)
            row = logits[r]
            self._emit(seq, self._sample(penalize(row, seq) if seq.params.penalized else row, seq), row)

    def _prefill(self, prompts: list[list[int]]):
        """One forward over the prompts, left-padded to the longest: per layer [keys, values] of
        [B, kv_heads, T, head_dim] (zero at the padding), the mask [B, T] and each prompt's last
        logits [B, vocab]. Padding is masked and positions count real tokens only, so each row's
        result is what the prompt alone gives (the greedy tests check it against generate)."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True)  # fmt: skip
        real = mask[:, None, :, None].bool()
        kv = [[torch.where(real, layer.keys, 0), torch.where(real, layer.values, 0)] for layer in cache.layers]
        return kv, mask, out.logits[:, -1].float()

    def _merge(self, seqs: list[Sequence], kv: list[list[torch.Tensor]], row_mask: torch.Tensor) -> None:
        """Add prefilled rows to the batch, left-padding whichever is shorter."""
        if not self._running:
            self._kv, self._mask, self._running = kv, row_mask, list(seqs)
            return
        t, n = self._mask.shape[1], row_mask.shape[1]
        width = max(t, n)
        for layer, (k, v) in zip(self._kv, kv, strict=True):
            layer[0] = torch.cat([F.pad(layer[0], (0, 0, width - t, 0)), F.pad(k, (0, 0, width - n, 0))])
            layer[1] = torch.cat([F.pad(layer[1], (0, 0, width - t, 0)), F.pad(v, (0, 0, width - n, 0))])
        self._mask = torch.cat([F.pad(self._mask, (width - t, 0)), F.pad(row_mask, (width - n, 0))])
        self._running.extend(seqs)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        for s in self._running:
            if s.finish_reason is not None:
                self._release(s)
        if not keep:
            self._running, self._kv, self._mask = [], [], None
            return
        index = torch.tensor(keep, device=self.device)
        self._running = [self._running[i] for i in keep]
        self._mask = self._mask.index_select(0, index)
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        self._mask = self._mask[:, lead:]
        self._kv = [[k.index_select(0, index)[:, :, lead:], v.index_select(0, index)[:, :, lead:]] for k, v in self._kv]

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

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _emit(self, seq: Sequence, token: int, logits: torch.Tensor | None = None) -> None:
        """Record a sampled token (with its logprobs when asked, from the step's raw `logits`) and
        stream its text; decide whether the sequence is finished."""
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
        if seq.params.logprobs is not None and logits is not None:  # before its event: readers find it
            seq.logprobs.append(token_logprobs(logits, token, seq.params.logprobs))
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
        notify(self.observer.counts, len(self._running), len(self._waiting))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `top` most likely tokens' (log-softmax of the
    model's logits for that step)."""
    lsm = torch.log_softmax(logits, dim=-1)
    if not top:
        return float(lsm[token]), []
    values, ids = lsm.topk(min(top, lsm.numel()))
    return float(lsm[token]), list(zip(ids.tolist(), values.tolist(), strict=True))


def penalize(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row's logits with the sequence's penalties, in the order Hugging Face and OpenAI apply
    them: the repetition penalty over prompt and output (HF's RepetitionPenaltyLogitsProcessor),
    then presence and frequency over the output (OpenAI's definition)."""
    p = seq.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.prompt + seq.output, device=logits.device).unique()
        picked = logits[seen]
        logits[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if seq.output and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(seq.output, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


def _checked(settings: BatchSettings) -> BatchSettings:
    if settings.max_batch_tokens is None:
        raise ValueError("a continuous batcher needs max_batch_tokens (the KV-cache tokens it may reserve)")
    return settings

"""Continuous (iteration-level) batching for causal language models: one forward per step for every
running sequence; new sequences join between steps, finished ones leave at once.

design: one generation thread per model (its "batch thread"). Each step it (1) admits waiting
sequences while a cache slot and the cache's token budget allow, each starting from the longest
stored prefix of its prompt (`prefixes.PrefixStore`); (2) feeds prompts to the cache, all the
newcomers of a step in one forward and at most `prefill_chunk` tokens per step, so a long prompt
is spread over steps instead of stalling the running streams; a prompt that is complete samples
its first token (exactly what `model.generate` gives alone: the tests compare every greedy
token); (3) runs one decode forward for all running sequences; (4) samples each row with its own
settings and generator, streams the token to its consumer, and drops rows that finished, were
cancelled or passed their deadline, freeing their slots at once.

The KV cache is `kvcache.SlotCache`: preallocated per-layer buffers with one row (slot) per
running sequence, each written in place at its own column, handed to the model as a `Cache` of
views with binserve's own attention mask and per-row positions: no per-step concatenation or
re-padding, and a decode step is one batched matmul per layer. Sequences with the same prompt
(a request's n choices) share one prefill: the followers copy the leader's row.

Bounds, from its `BatchSettings` (read once per step; `configure` swaps them whole): at most
`max_batch_size` sequences run, and the cache's rows x the longest reservation (prompt +
max_new_tokens, rounded up to a power of two) stay within `max_batch_tokens`; at most
`max_waiting` wait; past that, `submit` answers 429 with Retry-After. A prompt whose reservation
alone exceeds the cache is 413. It is a `contract.Scheduler`, as the request batcher is. No Flask
here.
"""

from __future__ import annotations

import inspect
import logging

import torch

from binserve.errors import LimitExceeded, ModelFailure
from binserve.scheduling.contract import BatchSettings, GenerationObserver
from binserve.scheduling.kvcache import SlotCache
from binserve.scheduling.prefixes import PrefixStore
from binserve.scheduling.sequences import Sequence
from binserve.scheduling.streams import GenerationStreams

#: what a continuous batcher runs with unless told: 16 sequences, 32 Ki cache tokens
DEFAULT_SETTINGS = BatchSettings(max_batch_size=16, max_batch_tokens=32768)
#: temperatures below this sample greedily, as vLLM does: in the limit they are greedy, and dividing
#: the logits by them would overflow to inf
GREEDY_BELOW = 1e-5

log = logging.getLogger("binserve.generation")


class ContinuousBatcher(GenerationStreams):
    """The generation loop of one causal LM; `submit` a prompt, read its `Sequence.events`. What
    it shares with the other backends (queue, futures, streaming a token) is `GenerationStreams`."""

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
        prefill_chunk: int = 512,
        prefix_tokens: int | None = None,
    ) -> None:
        super().__init__(
            tokenizer, settings, max_waiting=max_waiting, eos_ids=eos_ids, name=name, observer=observer, tag=tag
        )
        self.model = model
        self.device = device
        self.autocast = autocast
        self.step_threads = step_threads  # context manager giving the step its cores (runtime.batch_threads)
        self.prefill_chunk = prefill_chunk  # prompt tokens fed per step, at most
        self._rows: list[Sequence] = []  # the admitted sequences, each at its cache slot: row i is slot i
        self.cache = SlotCache(self._settings.max_batch_tokens, self._settings.max_batch_size, device)
        # stored prompt prefixes: a quarter of the cache's budget unless told
        self.prefixes = PrefixStore(self._settings.max_batch_tokens // 4 if prefix_tokens is None else prefix_tokens)
        self._attention = getattr(model.config, "_attn_implementation", None) or "eager"
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.steps = 0
        self.prefill_tokens = 0  # prompt tokens computed (not reused) so far

    def stats(self) -> dict:
        """What GET /models shows of the generation loop."""
        return {
            **super().stats(),
            "steps": self.steps,
            "cache_tokens": self.cache.allocated_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefix_hits": self.prefixes.hits,
            "prefix_reused_tokens": self.prefixes.reused_tokens,
            "prefix_cache_tokens": self.prefixes.tokens,
        }

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences now."""
        return len(self._rows), len(self._waiting)

    def _prepare(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)

    # --- the generation thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._rows:
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
                for seq in self._rows:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.end(("error", err))
                with self._cond:
                    self._rows, self._reserved = [], 0
                self.cache.used = 0  # every row ended: the buffers hold nothing anyone reads
            self._observe_counts()

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences while a slot and the cache's budget allow; each gets its slot
        (and the stored prefix of its prompt, if there is one)."""
        admitted = []
        s = self._settings  # this step's bounds
        self.cache.bound(s.max_batch_tokens, s.max_batch_size)
        longest = max((self._reservation(r) for r in self._rows), default=0)
        with self._cond:
            while self._waiting and len(self._rows) + len(admitted) < s.max_batch_size:
                seq = self._waiting[0]
                try:
                    self._check_fits(seq, s)  # queued under larger settings than today's: it never will
                except LimitExceeded as exc:
                    self._waiting.popleft()
                    seq.finish_reason = "error"
                    seq.end(("error", exc))
                    continue
                wider = max(longest, self._reservation(seq))
                if not self.cache.fits(len(self._rows) + len(admitted) + 1, wider):
                    break
                longest = wider
                self._waiting.popleft()
                self._reserved += self._reservation(seq)
                self.sequences += 1
                admitted.append(seq)
        if admitted:
            self.cache.reserve(longest)
            for seq, slot in zip(admitted, self.cache.add(len(admitted)), strict=True):
                seq.slot = slot
                self._rows.append(seq)
            self._place(admitted)
        return admitted

    def _place(self, seqs: list[Sequence]) -> None:
        """Start each newcomer's cache: a sequence with the same prompt as another newcomer (a
        request's n choices, or any two that ask the same) follows it and copies its row once it
        is prefilled; the others start from the longest stored prefix of their prompt."""
        leaders: dict[tuple, Sequence] = {}
        for seq in seqs:
            if self._gone(seq):
                continue
            key = tuple(seq.prompt)
            if key in leaders:
                seq.follows = leaders[key]
                continue
            leaders[key] = seq
            kv, length = self.prefixes.find(seq.prompt)
            if kv is not None and self.cache.write_row(seq.slot, kv, length):
                seq.cache_len = seq.reused = length

    def _forward(self, **kwargs):
        if self._keep_last:
            kwargs["logits_to_keep"] = 1  # the LM head on each row's last position only
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    return self.model(**kwargs)
            return self.model(**kwargs)

    def _run(self, seqs: list[Sequence], tokens: list[list[int]]) -> torch.Tensor:
        """One forward feeding each sequence's `tokens` from its cache length on: the last logits
        per row [n, vocab] (float32)."""
        counts = [len(t) for t in tokens]
        q = max(counts)
        ids = torch.tensor([[0] * (q - len(t)) + t for t in tokens], device=self.device)
        starts = [s.cache_len for s in seqs]
        positions, mask = self.cache.inputs([s.slot for s in seqs], starts, counts, self._attention)
        out = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache.cache(),
            use_cache=True,
        )  # fmt: skip
        return out.logits[:, -1].float()

    def _step(self) -> None:
        self._admit()
        self._drop_finished()  # newcomers already gone
        self._prefill()
        self._drop_finished()
        if self._rows:
            self._decode()
        self._drop_finished()

    def _prefill(self) -> None:
        """Feed prompts to the cache, at most `prefill_chunk` tokens in this step (oldest first):
        a longer prompt goes on in the next steps, so running streams wait for one bounded
        forward per step, not for the whole prompt. A prompt that is complete samples its first
        token, as do the sequences that follow it."""
        left = self.prefill_chunk
        work: list[tuple[Sequence, list[int]]] = []
        for seq in self._rows:
            if seq.cache_len >= len(seq.prompt) or seq.finish_reason is not None or self._gone(seq):
                continue
            if seq.follows is not None or left <= 0:
                continue
            part = seq.prompt[seq.cache_len : seq.cache_len + left]
            left -= len(part)
            work.append((seq, part))
        if not work:
            return
        logits = self._run([s for s, _ in work], [t for _, t in work])
        self.prefill_tokens += sum(len(t) for _, t in work)
        for (seq, part), row in zip(work, logits, strict=True):
            seq.cache_len += len(part)
            if seq.cache_len < len(seq.prompt):
                continue
            if self.prefixes.wants(seq.prompt, seq.reused):
                self.prefixes.add(seq.prompt, self.cache.read_row(seq.slot, self.prefixes.usable(seq.prompt)))
            for other in self._rows:
                if other.follows is seq:
                    self.cache.copy_row(seq.slot, other.slot, seq.cache_len)
                    other.cache_len, other.follows = seq.cache_len, None
                    self._first(other, row)
            self._first(seq, row)

    def _first(self, seq: Sequence, row: torch.Tensor) -> None:
        self._emit(seq, self._sample(penalize(row, seq) if seq.params.penalized else row, seq), _scorer(seq, row))

    def _decode(self) -> None:
        """One forward for every row: the decoding ones feed their last token; rows still being
        prefilled go along as placeholders (their write lands where their next chunk writes) so
        the step's rows stay one contiguous view of the cache."""
        rows = self._rows
        live = [seq.cache_len >= len(seq.prompt) and bool(seq.output) for seq in rows]
        if not any(live):
            return
        logits = self._run(rows, [[seq.output[-1] if ok else 0] for seq, ok in zip(rows, live, strict=True)])
        self.steps += 1
        greedy = logits.argmax(-1).tolist()  # one op for every greedy row, rather than one per row
        for i, seq in enumerate(rows):
            if not live[i]:
                continue
            seq.cache_len += 1
            if seq.params.penalized:  # its own row, penalized (a copy: the batch's logits are inference tensors)
                self._emit(seq, self._sample(penalize(logits[i], seq), seq), _scorer(seq, logits[i]))
            else:
                token = greedy[i] if seq.params.temperature == 0 else self._sample(logits[i], seq)
                self._emit(seq, token, _scorer(seq, logits[i]))

    def _drop_finished(self) -> None:
        """Free the slots of the sequences that ended; the rows kept move into the freed slots."""
        rows = self._rows
        gone = {i for i, s in enumerate(rows) if s.finish_reason is not None}
        if not gone:
            return
        for i in gone:
            self._release(rows[i])
        kept = [s for s in rows if s.finish_reason is None]
        moved = self.cache.remove(gone, max((s.cache_len for s in kept), default=0))
        new = rows[: len(kept)]
        for old, slot in moved.items():
            new[slot] = rows[old]
            rows[old].slot = slot
        self._rows = new
        for s in new:
            if s.follows is not None and s.follows.finish_reason is not None:
                s.follows = None  # its leader ended before its prefill did: it prefills itself

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        if p.temperature < GREEDY_BELOW:  # dividing by a near-0 temperature overflows the logits to inf
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
            drop[0] = False  # a top_p under float32's range (as 0) would drop even the first
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

def _scorer(seq: Sequence, logits: torch.Tensor):
    """What `_emit` asks for a token's logprobs entry (None when the sequence asked for none):
    from the step's raw logits, before temperature and penalties."""
    if seq.params.logprobs is None:
        return None
    return lambda token: token_logprobs(logits, token, seq.params.logprobs)


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

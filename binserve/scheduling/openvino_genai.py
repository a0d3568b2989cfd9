"""Generation on OpenVINO GenAI's continuous-batching engine (`ContinuousBatchingPipeline`): a
paged KV cache, prefix caching and split-fuse prefill in C++, one step for every running sequence.

design: the engine produces tokens; binserve decides what they mean. Each step this backend's
thread admits waiting sequences into the engine (`add_request`, within `max_batch_size` sequences
and `max_batch_tokens` reserved tokens), runs one `step()` (the engine releases the GIL while it
computes), reads every handle's new tokens and hands each to `GenerationStreams._emit`, the same
code binserve's own loop streams through: text deltas, stop strings, EOS and length end a sequence
for the same reasons on every backend. The engine is told to ignore EOS (`ignore_eos`) so that the
EOS decision is binserve's; a sequence that ended (stop string, EOS, cancelled, deadline) is
stopped in the engine before the next step, so it costs no further step. Sampling maps onto the
engine's GenerationConfig; what the engine cannot do is refused when the request is queued (400),
never silently changed. `openvino_genai` is imported only when a generator is built.
"""

from __future__ import annotations

import itertools
import logging
import secrets

import numpy as np

from binserve.errors import InvalidInput, ModelFailure
from binserve.scheduling.contract import BatchSettings, GenerationObserver
from binserve.scheduling.sequences import Sequence
from binserve.scheduling.streams import GenerationStreams

log = logging.getLogger("binserve.generation")

#: OpenVINO's inference-precision hints by binserve's precision names
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
#: the engine's KV-cache block on CPU (tokens); a sequence's reservation is rounded up to blocks
BLOCK_TOKENS = 32
#: OpenVINO 2026.4's bf16 pipeline dies of SIGFPE in its first step on one thread (one
#: INFERENCE_NUM_THREADS, or a process pinned to one core; fp32 runs): a crash no `except` catches,
#: so bf16 is refused below this rather than tried
MIN_BF16_THREADS = 2


class OpenVINOGenerator(GenerationStreams):
    """One model's generation on an exported OpenVINO model directory (`export.export_for_genai`)."""

    backend_type = "openvino-genai"

    def __init__(
        self,
        models_path,
        tokenizer,
        settings: BatchSettings,
        *,
        threads: int,
        precision: str = "fp32",
        prefill_chunk: int = 512,
        max_waiting: int = 256,
        eos_ids: tuple[int, ...] = (),
        name: str = "model",
        observer: GenerationObserver | None = None,
        tag: object = None,
    ) -> None:
        super().__init__(
            tokenizer, settings, max_waiting=max_waiting, eos_ids=eos_ids, name=name, observer=observer, tag=tag
        )
        import openvino
        import openvino_genai

        self._genai, self._tensor = openvino_genai, openvino.Tensor
        s = self._settings
        config = openvino_genai.SchedulerConfig()
        config.max_num_seqs = s.max_batch_size
        config.cache_size = 0  # sized by blocks instead: the same token budget as binserve's own loop
        config.num_kv_blocks = -(-s.max_batch_tokens // BLOCK_TOKENS) + s.max_batch_size
        config.max_num_batched_tokens = max(prefill_chunk, s.max_batch_size)
        config.dynamic_split_fuse = True  # a long prompt is spread over steps, as the loop's prefill_chunk does
        config.enable_prefix_caching = True
        if precision == "bf16" and threads < MIN_BF16_THREADS:
            raise ValueError(
                f"OpenVINO GenAI in bf16 needs {MIN_BF16_THREADS} threads or more (it crashes on {threads}); "
                "use fp32 on one core"
            )
        # the cores this worker may use (runtime.compute_threads), never OpenVINO's guess of the host's
        properties = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads}
        self.precision = precision
        self.pipe = openvino_genai.ContinuousBatchingPipeline(str(models_path), config, "CPU", properties)
        self._ids = itertools.count()
        self._running: dict[int, tuple[Sequence, object]] = {}
        self.steps = 0

    # --- request side ------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        return len(self._running), len(self._waiting)

    def _prepare(self, seq: Sequence) -> None:
        p = seq.params
        if p.logprobs:  # the engine reports the chosen token's log-probability, not the alternatives
            raise InvalidInput(
                f"model {self.name!r} runs on {self.backend_type}, which gives the chosen token's logprob only: "
                f"ask for 0 alternatives (top_logprobs / a logprobs count), not {p.logprobs}"
            )

    def stats(self) -> dict:
        return {**super().stats(), "precision": self.precision, "steps": self.steps}

    def _config(self, seq: Sequence):
        p = seq.params
        c = self._genai.GenerationConfig()
        c.max_new_tokens = p.max_new_tokens
        c.ignore_eos = True  # binserve ends at EOS itself (GenerationStreams._emit), as on every backend
        c.do_sample = p.temperature >= 1e-5  # the loop's GREEDY_BELOW
        if c.do_sample:
            c.temperature = p.temperature
            c.top_p = p.top_p
            if p.top_k:
                c.top_k = p.top_k
            # the engine's default seed is 0 for every request: unseeded requests would all sample alike
            c.rng_seed = p.seed if p.seed is not None else secrets.randbits(63)
        c.repetition_penalty = p.repetition_penalty
        c.presence_penalty = p.presence_penalty
        c.frequency_penalty = p.frequency_penalty
        if p.logprobs is not None:
            c.logprobs = 1
        return c

    # --- the generation thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running:
                    if self._closed:
                        return
                    self._cond.wait()
            try:
                self._step()
            except Exception as exc:  # a failing step fails its sequences, never the thread
                log.exception("model %s: generation step failed", self.name)
                err = ModelFailure(f"model {self.name!r} failed while generating ({type(exc).__name__})")
                for rid, (seq, handle) in list(self._running.items()):
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.end(("error", err))
                    self._drop(rid, seq, handle)

    def _admit(self) -> None:
        s = self._settings
        with self._cond:
            while self._waiting and len(self._running) < s.max_batch_size:
                seq = self._waiting[0]
                size = self._reservation(seq)
                if size > s.max_batch_tokens:  # queued under larger settings than today's: it never will
                    self._waiting.popleft()
                    try:
                        self._check_fits(seq, s)
                    except Exception as exc:  # noqa: BLE001 - LimitExceeded, handed to the consumer
                        seq.finish_reason = "error"
                        seq.end(("error", exc))
                    continue
                if self._running and self._reserved + size > s.max_batch_tokens:
                    break
                self._waiting.popleft()
                self._reserved += size
                self.sequences += 1
                rid = next(self._ids)
                ids = self._tensor(np.asarray([seq.prompt], dtype=np.int64))
                self._running[rid] = (seq, self.pipe.add_request(rid, ids, self._config(seq)))

    def _step(self) -> None:
        self._admit()
        for rid, (seq, handle) in list(self._running.items()):
            if self._gone(seq):
                self._drop(rid, seq, handle)
        self._observe_counts()
        if not self._running:
            return
        self.pipe.step()
        self.steps += 1
        for rid, (seq, handle) in list(self._running.items()):
            if handle.can_read():
                for out in handle.read().values():
                    logprobs = list(out.generated_log_probs) if seq.params.logprobs is not None else None
                    for i, token in enumerate(out.generated_ids):
                        entry = None if logprobs is None else (lambda _t, lp=logprobs[i]: (lp, []))
                        self._emit(seq, int(token), entry)
                        if seq.finish_reason is not None:
                            break
            if seq.finish_reason is None and handle.get_status() != self._genai.GenerationStatus.RUNNING:
                # the engine ended it without binserve's reasons (it dropped or failed it)
                seq.finish_reason = "error"
                seq.end(("error", ModelFailure(f"model {self.name!r}: the engine ended a sequence early")))
            if seq.finish_reason is not None:
                self._drop(rid, seq, handle)
        self._observe_counts()  # after the drops: the gauges reach 0 when the last sequence ends

    def _drop(self, rid: int, seq: Sequence, handle) -> None:
        if handle is not None and handle.get_status() == self._genai.GenerationStatus.RUNNING:
            handle.stop()  # no further step for it
        self._running.pop(rid, None)
        self._release(seq)

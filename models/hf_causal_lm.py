"""Adapter for a local Hugging Face causal LM directory: text generation with continuous batching.

design: unlike the one-forward adapters, a generation is many forwards, so the model's batch thread
is a `generation.ContinuousBatcher` (iteration-level batching, binserve's own batched KV cache) and
not the request batcher; `continuous_batcher()` makes it for the model manager. Requests carry a
prompt (token ids, or text / chat messages through the OpenAI routes, rendered with the tokenizer's
chat template) and sampling settings, checked here. On a GPU the steps run under bf16 (or fp16)
autocast where it is native; on a CPU in fp32. Weights load through safetensors only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from binary_protocol import as_array
from binserve.engines.generation import BACKEND_TYPES, Choice, candidates, greedy, max_gap, passes
from binserve.engines.settings import native
from binserve.errors import InvalidInput, LimitExceeded
from binserve.process.runtime import batch_threads, compute_threads, in_compute_thread
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import BatchSettings, GenerationObserver
from binserve.scheduling.sampling_bounds import BOUNDS, MAX_STOP_CHARS, MAX_STOPS
from binserve.scheduling.sequences import SamplingParams, Sequence
from binserve.scheduling.streams import GenerationStreams
from models.base import ModelAdapter
from models.contract import TensorSpec, Validated
from models.lm_scoring import continuation_logprobs

#: sampling keys a request may carry (native names; the OpenAI routes map theirs onto these)
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "logprobs")  # fmt: skip
#: the sampling values checked against their bounds (binserve/scheduling/sampling_bounds.py), with
#: SamplingParams' own defaults (None: not asked for; only those may be sent as null). max_new_tokens
#: has a bound of its own per model (its context).
log = logging.getLogger("binserve.models")
_DEFAULTS = {f.name: f.default for f in fields(SamplingParams) if f.name in BOUNDS and f.name != "max_new_tokens"}


class HFCausalLM(ModelAdapter):
    """A causal LM: `{"input_ids": [...], "max_new_tokens": N, ...}` in, generated ids out."""

    adapter_name = "hf_causal_lm"
    #: served by a continuous batcher (binserve/scheduling/continuous.py), not the request batcher
    generates = True
    #: what generates (chosen at warm-up); the loop until then
    backend = Choice("loop", note="chosen at warm-up")

    def load(self, root: Path) -> None:
        device = self.device
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        self._model = (
            AutoModelForCausalLM.from_pretrained(root, use_safetensors=True, local_files_only=True).to(device).eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        gen_eos = getattr(self._model.generation_config, "eos_token_id", None)
        eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(set(eos)))
        self.vocab_size = int(config.vocab_size)
        self.max_new_tokens = min(4096, self.max_context)
        # Tokenizing costs time per character: a prompt longer than this could never fit the context
        # (tokens are ~4 characters), so it is refused before tokenizing.
        self.max_prompt_chars = 32 * self.max_context
        self.autocast = next((d for d in (torch.bfloat16, torch.float16) if device.type == "cuda" and native(
            {torch.bfloat16: "bf16", torch.float16: "fp16"}[d], device)), None)  # fmt: skip

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    # --- requests -------------------------------------------------------------------------------
    def input_spec(self) -> dict:
        return {
            "input_ids": f"the prompt's token ids, 1-D (0 <= id < {self.vocab_size}); a list of them for several",
            "max_new_tokens": f"1..{self.max_new_tokens} (default 16)",
            "temperature": "0 (greedy) .. 2, default 1",
            "top_p": "(0, 1], default 1",
            "top_k": "0 (off) or more",
            "stop": f"up to {MAX_STOPS} strings that end the text (not included)",
            "seed": "int: the same seed, settings and prompt give the same text",
            "chat_template": self.tokenizer.chat_template is not None,
            "max_context": self.max_context,
        }

    def input_tensors(self) -> list[TensorSpec]:
        return [TensorSpec("input_ids", np.dtype(np.int64), (-1,))]

    def example_payload(self) -> dict:
        return {"input_ids": self.tokenizer("binserve warms the model up").input_ids, "max_new_tokens": 4}

    def sampling(self, values: dict, names: dict | None = None) -> SamplingParams:
        """SamplingParams from request values (native names), each checked; 400 naming a bad one by
        the name the caller used (`names`: native -> the protocol's, e.g. max_new_tokens -> max_tokens)."""

        def called(key: str) -> str:
            return (names or {}).get(key, key)

        n = values.get("max_new_tokens", 16)
        if type(n) is not int or not 1 <= n <= self.max_new_tokens:
            raise InvalidInput(f"'{called('max_new_tokens')}' must be an int in [1, {self.max_new_tokens}], got {n!r}")
        checked = {}
        for key, default in _DEFAULTS.items():
            value, bound = values.get(key, default), BOUNDS[key]
            if not (value is None and default is None) and not bound.holds(value):
                raise InvalidInput(f"'{called(key)}' must be {bound.describe()}, got {value!r}")
            checked[key] = float(value) if value is not None and not bound.integer else value
        stop = values.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if (
            not isinstance(stop, (list, tuple))
            or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
        ):
            raise InvalidInput(
                f"'{called('stop')}' must be a string or up to {MAX_STOPS} non-empty strings of <= {MAX_STOP_CHARS}"
            )
        return SamplingParams(max_new_tokens=n, stop=tuple(stop), **checked)

    def check_prompt(self, ids: list[int], params: SamplingParams, names: dict | None = None) -> list[int]:
        """A prompt within the vocabulary and, with its new tokens, within the model's context."""
        called = (names or {}).get("max_new_tokens", "max_new_tokens")
        if not ids:
            raise InvalidInput("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidInput(f"the prompt has token ids outside [0, {self.vocab_size})")
        if len(ids) + params.max_new_tokens > self.max_context:
            raise LimitExceeded(
                f"prompt ({len(ids)} tokens) + {called} ({params.max_new_tokens}) is over this model's "
                f"context of {self.max_context}"
            )
        return ids

    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        extra = set(payload) - {"input_ids", *SAMPLING_KEYS}
        if extra or "input_ids" not in payload:
            raise InvalidInput(f"expected 'input_ids' and sampling keys {list(SAMPLING_KEYS)}; got {sorted(payload)}")
        if "logprobs" in payload:
            raise InvalidInput("'logprobs' are answered by /v1/completions and /v1/chat/completions, not /infer")
        params = self.sampling(payload)
        value = payload["input_ids"]
        rows = None
        if isinstance(value, np.ndarray) and value.ndim == 2:
            rows = list(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray)):
            rows = value
        if rows is None:
            prompt = as_array(value, dtype=np.int64, name="input_ids")
            if prompt.ndim != 1:
                raise InvalidInput("'input_ids' must be one prompt (1-D) or a list of prompts")
            return Validated([(self.check_prompt(prompt.tolist(), params), params)], batched=False)
        self.check_samples(len(rows), "'input_ids'")
        prompts = [as_array(r, dtype=np.int64, name=f"input_ids[{i}]") for i, r in enumerate(rows)]
        return Validated([(self.check_prompt(p.tolist(), params), params) for p in prompts], batched=True)

    def _check_chars(self, n: int, what: str) -> None:
        if n > self.max_prompt_chars:
            raise LimitExceeded(
                f"{what} has {n} characters; this model's context ({self.max_context} tokens) takes at most "
                f"{self.max_prompt_chars}"
            )

    def chat_prompt(self, messages) -> list[int]:
        """Token ids of chat `messages` under the tokenizer's chat template, ready for the reply."""
        if self.tokenizer.chat_template is None:
            raise InvalidInput(f"model {self.name!r} has no chat template; use /v1/completions")
        if not isinstance(messages, list) or not messages:
            raise InvalidInput("'messages' must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidInput(f"message {i} must have a string 'role' and a string 'content'")
        if len(messages) > self.max_context:
            raise LimitExceeded(f"{len(messages)} messages cannot fit this model's {self.max_context}-token context")
        self._check_chars(sum(len(m["content"]) for m in messages), "'messages'")
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, as logprobs show it: decoded as the reply's text is (special tokens
        skipped, so the tokens join into the text); a token inside a character shows U+FFFD."""
        return [self.tokenizer.decode([i], skip_special_tokens=True) for i in ids]

    def continuation_logprobs(self, prefixes: list[list[int]], continuations: list[list[int]]) -> np.ndarray:
        """(T, K) log P(continuation | prefix) for every pair, each prefix computed once
        (models/lm_scoring.py); on the calling thread, with its share of the cores."""
        with batch_threads():
            return continuation_logprobs(self._model, prefixes, continuations, self.tokenizer.pad_token_id or 0)

    def text_prompt(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt."""
        self._check_chars(len(prompt), "'prompt'")
        return self.tokenizer(prompt).input_ids

    def join(self, outputs: list[dict], batched: bool, options: dict | None = None) -> dict:
        ids = [np.asarray(o["output_ids"], dtype=np.int64) for o in outputs]
        reasons = [o["finish_reason"] for o in outputs]
        if not batched:
            return {"output_ids": ids[0], "finish_reason": reasons[0]}
        return {"output_ids": ids, "finish_reason": reasons}

    # --- serving ----------------------------------------------------------------------------------
    def continuous_batcher(
        self, settings: BatchSettings, observer: GenerationObserver | None = None, **loop
    ) -> GenerationStreams:
        """This model's generation backend (chosen and checked at warm-up: binserve/engines/generation.py),
        bounded by the model's batching settings (`loop`: the loop's prefill chunk and prefix store)."""
        backend = self.backend
        if backend.kind == "openvino":
            return self._openvino(backend, settings, observer, prefill_chunk=loop.get("prefill_chunk", 512))
        return ContinuousBatcher(
            self._model,
            self.tokenizer,
            self.device,
            settings,
            eos_ids=self.eos_ids,
            name=self.name,
            observer=observer,
            autocast=self.autocast,
            step_threads=batch_threads,
            tag=self.version,
            **loop,
        )

    def _openvino(self, backend: Choice, settings: BatchSettings, observer=None, prefill_chunk: int = 512):
        from binserve.scheduling.openvino_genai import OpenVINOGenerator

        return OpenVINOGenerator(
            backend.path, self.tokenizer, settings, precision=backend.precision, threads=compute_threads(),
            prefill_chunk=prefill_chunk, eos_ids=self.eos_ids, name=self.name, observer=observer, tag=self.version,
        )  # fmt: skip

    def _choose_backend(self, loop: ContinuousBatcher) -> Choice:
        """The backend this version generates on (binserve/engines/generation.py says how it is chosen)."""
        asked = self.options.runtime.generation_backend
        if asked == "loop":
            return Choice("loop", note="generation_backend=loop")
        if self.device.type != "cpu":
            if asked == "openvino":
                raise RuntimeError(f"{self.name}: generation_backend=openvino runs on the CPU, not {self.device}")
            return Choice("loop", note=f"OpenVINO GenAI serves CPUs; {self.device} generates on the loop")
        try:
            from binserve.engines.genai_export import export_for_genai, export_python

            path = export_for_genai(self.model_dir, self.options.runtime.cache_dir, export_python(
                self.options.runtime.export_python))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - not installed, no export env, export failed: said below
            if asked == "openvino":
                raise RuntimeError(f"{self.name}: generation_backend=openvino is not available: {exc}") from exc
            log.warning("model %s: generating on binserve's loop: OpenVINO GenAI is not available (%s)", self.name, exc)
            return Choice("loop", note=f"OpenVINO GenAI not available: {exc}")
        prompts = self.check_prompts()
        failed = []
        for precision in candidates(self.options.runtime.precision, native("bf16", self.device), compute_threads()):
            engine = self._openvino(Choice("openvino", precision, str(path)), loop.settings).start()
            try:
                gap = max_gap(self._model, prompts, greedy(engine, prompts))
            finally:
                engine.close()
            if passes(precision, gap):
                note = f"passed its {precision} check (greedy tokens at most {gap:.2g} nats off fp32's best)"
                return Choice("openvino", precision, str(path), note=note)
            failed.append(f"{precision}: {gap:.3g}")
        why = (f"OpenVINO GenAI's greedy tokens are further than allowed from the fp32 model's best "
               f"({', '.join(failed)} nats)")  # fmt: skip
        if asked == "openvino":
            raise RuntimeError(f"{self.name}: {why}")
        log.warning("model %s: generating on binserve's loop: %s", self.name, why)
        return Choice("loop", note=why)

    def check_prompts(self) -> list[list[int]]:
        """The prompts a backend's greedy tokens are checked on."""
        texts = ["binserve warms the model up", "Hello", "The quick brown fox jumps over", "1 2 3 4 5"]
        return [self.tokenizer(t).input_ids for t in texts]

    def signature(self) -> dict:
        """What every version of a generative model produces, per sample, whatever it generates."""
        return {"output_ids": ((-1,), "int64"), "finish_reason": ((), "str")}

    def prepare(self) -> None:
        """No engine plan: generation runs the torch module (under autocast on a GPU)."""
        in_compute_thread()

    def warmup(self, batch_sizes=(1, 4)) -> None:
        """Generate a few tokens for the example, to load kernels and check the model runs."""
        in_compute_thread()
        b = ContinuousBatcher(self._model, self.tokenizer, self.device, eos_ids=(), autocast=self.autocast).start()
        try:
            for n in batch_sizes:
                seqs = [
                    b.submit_sequence(
                        Sequence(self.example_payload()["input_ids"], SamplingParams(4, 0.0), time.monotonic() + 120)
                    )  # fmt: skip
                    for _ in range(n)
                ]
                for s in seqs:
                    for _ in s.stream(120):
                        pass
                    if len(s.output) != 4:
                        raise RuntimeError(f"{self.name}: warm-up generated {len(s.output)} of 4 tokens")
            self.backend = self._choose_backend(b)
        finally:
            b.close()

    def run_batch(self, samples: list) -> list[dict]:
        raise RuntimeError("generative models run on their continuous batcher (binserve/scheduling/continuous.py)")

    def describe(self) -> dict:
        backend = self.backend
        if backend.kind == "openvino":
            engines = [f"openvino-genai-{backend.precision}"]
            runtime = {"generation": "OpenVINO GenAI continuous batching"}
        else:
            precision = "fp32" if self.autocast is None else str(self.autocast).replace("torch.", "")
            engines = [f"torch-{precision}"]
            runtime = {"generation": "continuous batching", "autocast": str(self.autocast) if self.autocast else None}
        runtime |= {"backend_type": BACKEND_TYPES[backend.kind], "backend_note": backend.note}
        return {**super().describe(), "engines": engines, "runtime": runtime}

    # the engine-planning contract of one-forward adapters does not apply to generation
    def collate(self, samples: list) -> dict[str, np.ndarray]:
        raise RuntimeError("generative models do not collate batches; the continuous batcher keeps its own cache")

    def torch_forward(self, module, inputs):
        raise RuntimeError("generative models run forward steps in the continuous batcher")

    def accuracy(self, reference, got):
        raise RuntimeError("generative models have no engine plan to gate")

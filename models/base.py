"""The adapter contract between the server and a model.

design: an adapter owns one loaded model on one device and knows its inputs. The request thread
calls `validate` (decode-time checks and any CPU work such as tokenization, BEFORE the request is
queued, so a bad request never reaches a batch); the batch thread calls `run_batch` with the
samples of many requests (collate, forward under `torch.inference_mode`, split back to one output
per sample); the request thread calls `join` to shape the reply. Adapters never import Flask.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch

from errors import LimitExceeded
from runtime import DeviceRunner


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of an adapter, checked in `validate` before any expensive step."""

    #: samples (texts, token rows, array rows) in one request: more could never fit the queue
    max_samples: int = 2048
    #: characters per text before tokenizing; 0: 100 x the model's maximum tokens
    max_text_chars: int = 0
    #: cut texts and token rows to the model's maximum length (True), or refuse them with 413
    truncate: bool = True


@dataclass(frozen=True)
class AdapterOptions:
    """How a model version is served, beyond its files: what the operator configured."""

    #: "bf16", "fp16" or "off": autocast on a GPU
    autocast: str = "bf16"
    limits: RequestLimits = RequestLimits()
    #: package prefixes that model code (torch_module classes) may be imported from; see README
    trusted_modules: tuple[str, ...] = ("models",)


@dataclass(frozen=True)
class Validated:
    """A request checked against the model: its samples, and whether the reply keeps a batch axis."""

    samples: list
    batched: bool


class ModelAdapter(abc.ABC):
    """One loaded model version on one device."""

    #: registry name of the adapter ("hf_encoder", "torch_module")
    adapter_name: str = ""
    #: True when samples are token rows padded per batch: the batcher then bounds batches by
    #: padded tokens and groups similar lengths, using `sample_length`.
    token_inputs: bool = False

    def __init__(self, name: str, version: str, device: torch.device, options: AdapterOptions | None = None) -> None:
        self.name = name
        self.version = version
        self.device = device
        self.options = options or AdapterOptions()
        self.limits = self.options.limits
        #: staging buffers, streams and autocast for this model's batches
        self.runner = DeviceRunner(device, self.options.autocast)

    @abc.abstractmethod
    def input_spec(self) -> dict:
        """JSON description of the accepted inputs (shown by GET /models)."""

    @abc.abstractmethod
    def validate(self, payload: dict) -> Validated:
        """Check a decoded request and turn it into samples; raises errors.InvalidInput (400) or
        errors.LimitExceeded (413). Sizes are checked before anything costs more than the request."""

    def check_samples(self, n: int, what: str) -> None:
        """413 for a request of more samples than `limits.max_samples` (it could never be queued)."""
        if n > self.limits.max_samples:
            raise LimitExceeded(
                f"{what} holds {n} samples; one request may hold at most {self.limits.max_samples} "
                "(max_queue_samples): split it into several requests"
            )

    @abc.abstractmethod
    def run_batch(self, samples: list) -> list[dict]:
        """Run samples from many requests as one batch; returns one output dict per sample."""

    def join(self, outputs: list[dict], batched: bool) -> dict:
        """One request's reply from its per-sample output dicts: stacked, or the lone sample's."""
        if not batched:
            return dict(outputs[0])
        return {k: np.stack([o[k] for o in outputs]) for k in outputs[0]}

    @abc.abstractmethod
    def example_payload(self) -> dict:
        """A valid request, used to warm the model up and to check a freshly loaded version."""

    @property
    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The underlying torch module (for parameter counts and dtype)."""

    def sample_length(self, sample) -> int:
        """Tokens in one sample (only called when `token_inputs`)."""
        return len(sample)

    def warmup(self, batch_sizes=(1, 4)) -> None:
        """Run the example through the model at a few batch sizes (allocator, kernels, caches)."""
        validated = self.validate(self.example_payload())
        for n in batch_sizes:
            samples = (validated.samples * n)[:n]
            outputs = self.run_batch(samples)
            if len(outputs) != n:
                raise RuntimeError(f"{self.name}: warm-up returned {len(outputs)} outputs for {n} inputs")

    def describe(self) -> dict:
        """What GET /models shows about this model."""
        params = list(self.module.parameters())
        return {
            "name": self.name,
            "version": self.version,
            "adapter": self.adapter_name,
            "device": str(self.device),
            "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
            "autocast": str(self.runner.autocast).replace("torch.", "") if self.runner.autocast else "off",
            "device_memory_bytes": self.runner.memory_bytes(),
            "parameters": sum(p.numel() for p in params),
            "inputs": self.input_spec(),
        }

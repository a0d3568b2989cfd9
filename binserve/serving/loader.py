"""How a repository version becomes servable on this worker: adapter, warm-up, check, scheduler.

design: the model manager decides what to serve and when; this builds it. `load` loads a version
with the operator's adapter options, warms it up (choosing its engines) and checks it on its
example (finite outputs: its signature); `scheduler` gives it the continuous batcher of a
generative model or a request batcher over its slot, with the version's batching settings (its own
binserve.json over the server's flags); `release_memory` gives a dropped version's memory back.
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from binserve.config import ServerConfig
from binserve.engines.settings import RuntimeSettings
from binserve.observability import metrics
from binserve.process.memory import trim_heap
from binserve.scheduling.batcher import Batcher
from binserve.scheduling.contract import BatchSettings, Scheduler
from binserve.serving.repository import ModelRepository
from binserve.serving.served import ModelSlot, ServedVersion, signature_of
from binserve.serving.weights import check_weights
from models.base import AdapterOptions, ModelAdapter, RequestLimits
from models.registry import load_model

log = logging.getLogger("binserve.models")


def adapter_options(config: ServerConfig) -> AdapterOptions:
    """What the operator's settings say about serving any version: request limits, runtimes, trust."""
    limits = RequestLimits(
        max_samples=config.max_queue_samples,
        max_text_chars=config.max_text_chars,
        max_text_tokens=config.max_text_tokens,
        truncate=config.truncate,
        max_image_bytes=config.max_image_bytes,
        max_image_pixels=config.max_image_pixels,
        max_decoded_bytes=config.max_decoded_bytes,
    )
    runtime = RuntimeSettings(
        config.runtime, config.precision, config.min_cosine, cache_dir=config.cache_dir or None,
        generation_backend=config.generation_backend, export_python=config.openvino_export_python,
        compile=config.torch_compile,
    )  # fmt: skip
    return AdapterOptions(runtime, limits, config.trusted_module_prefixes, config.pinned_staging)


class VersionLoader:
    """Loads, warms and checks versions from `repo` on `device`, and gives each its scheduler."""

    def __init__(self, config: ServerConfig, device: torch.device, repo: ModelRepository) -> None:
        self.config = config
        self.device = device
        self.repo = repo
        self.adapter_options = adapter_options(config)

    def load(self, name: str, version: str) -> ServedVersion:
        """`version` of model `name`, loaded, warm and checked (raises whatever its load raised)."""
        started = time.monotonic()
        spec = self.repo.spec(name, version)
        check_weights(spec.path)  # a file cut short is named here, not deep inside the load
        adapter = load_model(spec, self.device, self.adapter_options)
        adapter.warmup()
        signature = signature_of(adapter)
        log.info(
            "model %s version %s: loaded in %.1fs, engines %s", name, version, time.monotonic() - started,
            adapter.describe()["engines"],
        )  # fmt: skip
        cacheable = bool(spec.settings.get("cache", True))
        return ServedVersion(adapter, signature, cacheable)

    def batch_settings(self, name: str, version: str, adapter: ModelAdapter) -> BatchSettings:
        """The scheduler's settings for a version: its own (binserve.json), else the server's flags.
        Token budgets apply to token rows and to generation (cache tokens), not to array models."""
        own = self.repo.spec(name, version).settings
        c = self.config
        tokens = own.get("max_batch_tokens", c.max_batch_tokens) if adapter.token_inputs or adapter.generates else None
        return BatchSettings(
            max_batch_size=own.get("max_batch_size", c.max_batch_size),
            max_batch_tokens=tokens,
            max_wait_ms=own.get("max_wait_ms", c.max_wait_ms),
            preferred_batch_size=c.preferred_batch_size,
        )

    def scheduler(self, adapter: ModelAdapter, slot: ModelSlot, settings: BatchSettings) -> Scheduler:
        """A started scheduler: the continuous batcher of a generative model, else the request batcher
        over the model's slot."""
        if adapter.generates:
            c = self.config
            observer = metrics.GenerationMetrics(adapter.name)
            return adapter.continuous_batcher(
                settings, observer, prefill_chunk=c.prefill_chunk_tokens, prefix_tokens=c.prefix_cache_tokens
            ).start()
        return Batcher(
            slot.run,
            settings,
            max_queue_samples=self.config.max_queue_samples,
            sample_len=adapter.sample_length if adapter.token_inputs else None,
            name=adapter.name,
            observer=metrics.BatchMetrics(adapter.name),
        ).start()

    def release_memory(self) -> None:
        """Give a dropped version's memory back: Python objects, the CUDA cache, glibc's free lists."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        trim_heap()

"""The models one worker serves: loading them off the request path, hot reload, a batcher for each.

design: `start()` registers the configured models in the model repository, then loads and warms
the repository's current version of each on a background thread, so Gunicorn's heartbeat keeps
beating and /readyz says 503 until all are warm. Each model sits in a `ModelSlot` that its
`Batcher` calls: the slot reads its adapter once per batch, so swapping `slot.adapter` between
batches means no batch mixes versions, and every batch is tagged with the version that ran it.
A watcher thread polls the repository; when a model's CURRENT names another version it loads that
version beside the old one, warms it, checks it (finite outputs with the old version's keys and
shapes), swaps it in and lets the old one go. `update()` (POST /update_model) does the same check
first, then moves CURRENT and waits until every live worker reports the new version.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

import metrics
from batching import Batcher, Tagged
from config import ServerConfig
from errors import BadRequest, ModelLoadFailed, ModelNotFound, NotReady
from model_repository import ModelRepository
from models.base import ModelAdapter, RequestLimits
from models.registry import load_model, parse_specs
from runtime import trim_heap

log = logging.getLogger("binserve.models")


def _signature(adapter: ModelAdapter) -> dict:
    """Output keys, per-sample shapes and dtypes on the example payload; raises if not finite."""
    v = adapter.validate(adapter.example_payload())
    outputs = adapter.run_batch(v.samples)
    sig = {}
    for out in outputs:
        for k, arr in out.items():
            arr = np.asarray(arr)
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise ValueError(f"output {k!r} is not finite on the example input")
            sig[k] = (arr.shape, str(arr.dtype))
    return sig


class ModelSlot:
    """The version of one model that batches run on now; swapped between batches."""

    def __init__(self, adapter: ModelAdapter, signature: dict) -> None:
        self.adapter = adapter
        self.signature = signature

    def run(self, samples: list) -> Tagged:
        adapter = self.adapter  # read once: the whole batch runs on one version
        outputs = adapter.run_batch(samples)
        memory = adapter.runner.memory_bytes()
        if memory is not None:
            metrics.DEVICE_MEMORY.labels(str(adapter.device)).set(memory)
        return Tagged(outputs, adapter.version)


@dataclass
class LoadedModel:
    """A served model: its slot (current version) and the batcher that feeds it."""

    name: str
    slot: ModelSlot
    batcher: Batcher

    @property
    def adapter(self) -> ModelAdapter:
        return self.slot.adapter


def _release_memory(device: torch.device) -> None:
    """Give a dropped model's memory back: Python objects, the CUDA cache, glibc's free lists."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()


class ModelManager:
    """Loads the configured models and hands out the one a request names."""

    def __init__(self, config: ServerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        specs = parse_specs(config.models)
        self.names = [s.name for s in specs]
        self.default_name = config.default_model or self.names[0]
        if self.default_name not in self.names:
            raise ValueError(f"default_model {self.default_name!r} is not among the models {self.names}")
        self.repo = ModelRepository(config.model_repository)
        for spec in specs:
            self.repo.register(spec)
        self.poll_s = config.repository_poll_ms / 1000.0
        self.request_limits = RequestLimits(
            max_samples=config.max_queue_samples, max_text_chars=config.max_text_chars, truncate=config.truncate
        )
        self._models: dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in self.names}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._failed: dict[str, str] = {}  # model -> version whose load failed here (not retried)
        self.load_error: str | None = None
        self.draining = False  # set on SIGTERM: /readyz says 503 while accepted requests finish
        self.pid = os.getpid()

    @property
    def ready(self) -> bool:
        """True once every configured model is loaded and warm."""
        return self._ready.is_set()

    def start(self, background: bool = True) -> ModelManager:
        """Load and warm all models (on a thread unless `background` is False), then watch the repository."""
        if background:
            threading.Thread(target=self._load_all, name="binserve-loader", daemon=True).start()
        else:
            self._load_all()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until ready (or the timeout); returns readiness."""
        return self._ready.wait(timeout_s)

    def _load_version(self, name: str, version: str) -> tuple[ModelAdapter, dict]:
        adapter = load_model(self.repo.spec(name, version), self.device, self.config.autocast, self.request_limits)
        adapter.warmup()
        return adapter, _signature(adapter)

    def _load_all(self) -> None:
        try:
            for name in self.names:
                version = self.repo.current(name)
                adapter, signature = self._load_version(name, version)
                slot = ModelSlot(adapter, signature)
                batcher = Batcher(
                    slot.run,
                    max_batch_size=self.config.max_batch_size,
                    max_queue_samples=self.config.max_queue_samples,
                    max_wait_ms=self.config.max_wait_ms,
                    max_batch_tokens=self.config.max_batch_tokens,
                    sample_len=adapter.sample_length if adapter.token_inputs else None,
                    name=name,
                    observer=metrics.BatchMetrics(name),
                ).start()
                self._models[name] = LoadedModel(name, slot, batcher)
                self.repo.report(name, self.pid, version)
                metrics.set_model_info(name, version, str(self.device), adapter.describe()["dtype"])
                log.info("model %s version %s (%s) is warm on %s", name, version, adapter.adapter_name, self.device)
            self._ready.set()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading models failed")
            return
        threading.Thread(target=self._watch, name="binserve-repository-watch", daemon=True).start()

    # --- hot reload ------------------------------------------------------------------------------
    def _swap_in(self, loaded: LoadedModel, version: str) -> None:
        """Load, warm and check `version` of `loaded` beside the serving one, then serve it."""
        adapter, signature = self._load_version(loaded.name, version)
        if signature != loaded.slot.signature:
            raise ValueError(
                f"version {version} gives outputs {signature}, the serving version gives {loaded.slot.signature}"
            )
        old = loaded.slot.adapter
        loaded.slot.adapter, loaded.slot.signature = adapter, signature  # the next batch runs on it
        self.repo.report(loaded.name, self.pid, version)
        metrics.set_model_info(loaded.name, version, str(self.device), adapter.describe()["dtype"], old.version)
        metrics.RELOADS.labels(loaded.name, "success").inc()
        log.info("model %s: now serving version %s (was %s)", loaded.name, version, old.version)
        del old
        _release_memory(self.device)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for name, loaded in self._models.items():
                version = None
                try:
                    version = self.repo.current(name)
                    if version != loaded.adapter.version and self._failed.get(name) != version:
                        with self._locks[name]:
                            if version != loaded.adapter.version:
                                self._swap_in(loaded, version)
                    self.repo.report(name, self.pid, loaded.adapter.version)
                except Exception:
                    metrics.RELOADS.labels(name, "failure").inc()
                    self._failed[name] = version
                    log.exception("model %s: could not switch to version %s", name, version)

    def update(
        self, name: str, *, version: str | None, path: str | None, adapter: str | None, timeout_s: float
    ) -> dict:
        """Check a version (or import `path` as one), make it current, and wait for every worker."""
        loaded = self.get(name)
        with self._locks[name]:
            if path is not None:
                try:
                    version = self.repo.import_version(name, path, adapter or loaded.adapter.adapter_name)
                except (ValueError, OSError) as exc:
                    raise BadRequest(f"could not import {path!r} as a version of {name!r}: {exc}") from None
            try:
                self.repo.spec(name, version)  # exists and is readable, before anything is loaded
            except KeyError as exc:
                raise ModelNotFound(str(exc.args[0])) from None
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            if version != loaded.adapter.version:
                reason = None
                try:
                    self._swap_in(loaded, version)
                except Exception as exc:
                    # keep only the text: the traceback's frames still hold the refused model
                    reason = f"{type(exc).__name__}: {exc}"
                if reason is not None:
                    metrics.RELOADS.labels(name, "failure").inc()
                    _release_memory(self.device)
                    raise ModelLoadFailed(
                        f"version {version} of {name!r} was refused and version {loaded.adapter.version} keeps "
                        f"serving: {reason}"
                    )
            self._failed.pop(name, None)
            self.repo.set_current(name, version)
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.repo.workers(name, max_age_s=3 * self.poll_s + 1)
            lagging = {pid: v for pid, v in workers.items() if v != version}
            if not lagging or time.monotonic() >= deadline:
                return {"model": name, "version": version, "converged": not lagging, "workers": workers}
            time.sleep(self.poll_s / 2)  # polling the workers' reports, which they refresh every poll

    # --- lookups ---------------------------------------------------------------------------------
    def get(self, name: str | None) -> LoadedModel:
        """The loaded model `name` (None: the default one)."""
        name = name or self.default_name
        loaded = self._models.get(name)
        if loaded is not None:
            return loaded
        if name not in self.names:
            raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(self.names)}")
        if self.load_error:
            raise NotReady(f"model {name!r} failed to load; GET /readyz says why")
        raise NotReady(f"model {name!r} is still loading", retry_after_s=1.0)

    def describe(self) -> list[dict]:
        """GET /models: each loaded model's description, batching settings and per-worker versions."""
        out = []
        for loaded in self._models.values():
            info = loaded.adapter.describe()
            info["default"] = loaded.name == self.default_name
            info["worker_pid"] = self.pid
            info["repository_version"] = self.repo.current(loaded.name)
            info["workers"] = self.repo.workers(loaded.name, max_age_s=3 * self.poll_s + 1)
            info["batching"] = {
                "max_batch_size": loaded.batcher.max_batch_size,
                "max_batch_tokens": loaded.batcher.max_batch_tokens if loaded.adapter.token_inputs else None,
                "max_wait_ms": loaded.batcher.max_wait_s * 1000,
                "queued_samples": loaded.batcher.queued_samples,
            }
            info["stats"] = loaded.batcher.stats.as_dict()
            out.append(info)
        return out

    def start_draining(self) -> None:
        """The worker is shutting down: report not-ready so load balancers stop sending requests."""
        self.draining = True

    def close(self) -> None:
        """Stop watching, finish queued work and stop every batcher."""
        self._stop.set()
        for loaded in self._models.values():
            loaded.batcher.close()
            self.repo.forget(loaded.name, self.pid)

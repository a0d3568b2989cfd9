"""The models one worker serves: loading them off the request path, and a batcher for each.

design: `start()` loads and warms every configured model on a background thread, so Gunicorn's
worker heartbeat keeps beating and /healthz answers while /readyz says 503 until all are warm.
Each loaded model gets its own `Batcher` (one queue, one thread). Lookups by name answer
ModelNotFound (404) for unknown names and NotReady (503) while loading.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from batching import Batcher
from config import ServerConfig
from errors import ModelNotFound, NotReady
from models.base import ModelAdapter
from models.registry import ModelSpec, load_model, parse_specs

log = logging.getLogger("binserve.models")


@dataclass
class LoadedModel:
    """A warm model and the batcher that feeds it."""

    spec: ModelSpec
    adapter: ModelAdapter
    batcher: Batcher


class ModelManager:
    """Loads the configured models and hands out the one a request names."""

    def __init__(self, config: ServerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.specs = parse_specs(config.models)
        self.default_name = config.default_model or self.specs[0].name
        if self.default_name not in {s.name for s in self.specs}:
            names = [s.name for s in self.specs]
            raise ValueError(f"default_model {self.default_name!r} is not among the models {names}")
        self._models: dict[str, LoadedModel] = {}
        self._ready = threading.Event()
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        """True once every configured model is loaded and warm."""
        return self._ready.is_set()

    def start(self, background: bool = True) -> ModelManager:
        """Load and warm all models, on a thread unless `background` is False."""
        if background:
            threading.Thread(target=self._load_all, name="binserve-loader", daemon=True).start()
        else:
            self._load_all()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until ready (or the timeout); returns readiness."""
        return self._ready.wait(timeout_s)

    def _load_all(self) -> None:
        try:
            for spec in self.specs:
                adapter = load_model(spec, self.device, self.config.autocast)
                adapter.warmup()
                batcher = Batcher(
                    adapter.run_batch,
                    max_batch_size=self.config.max_batch_size,
                    max_queue_samples=self.config.max_queue_samples,
                    max_wait_ms=self.config.max_wait_ms,
                    max_batch_tokens=self.config.max_batch_tokens,
                    sample_len=adapter.sample_length if adapter.token_inputs else None,
                    name=spec.name,
                ).start()
                self._models[spec.name] = LoadedModel(spec, adapter, batcher)
                log.info("model %s (%s, version %s) is warm on %s", spec.name, spec.adapter, spec.version, self.device)
            self._ready.set()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading models failed")

    def get(self, name: str | None) -> LoadedModel:
        """The loaded model `name` (None: the default one)."""
        name = name or self.default_name
        loaded = self._models.get(name)
        if loaded is not None:
            return loaded
        if name not in {s.name for s in self.specs}:
            raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(s.name for s in self.specs)}")
        if self.load_error:
            raise NotReady(f"model {name!r} failed to load: {self.load_error}")
        raise NotReady(f"model {name!r} is still loading", retry_after_s=1.0)

    def describe(self) -> list[dict]:
        """GET /models: each loaded model's description and its batching settings."""
        out = []
        for loaded in self._models.values():
            info = loaded.adapter.describe()
            info["default"] = loaded.spec.name == self.default_name
            info["batching"] = {
                "max_batch_size": loaded.batcher.max_batch_size,
                "max_batch_tokens": loaded.batcher.max_batch_tokens if loaded.adapter.token_inputs else None,
                "max_queue_samples": loaded.batcher.max_queue_samples,
                "max_wait_ms": loaded.batcher.max_wait_s * 1000,
                "queued_samples": loaded.batcher.queued_samples,
            }
            info["stats"] = loaded.batcher.stats.as_dict()
            out.append(info)
        return out

    def close(self) -> None:
        """Finish queued work and stop every batcher."""
        for loaded in self._models.values():
            loaded.batcher.close()

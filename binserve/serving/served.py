"""A served model as the manager holds it: the checked version batches run on, and its scheduler.

design: a `ServedVersion` (an adapter and its output signature) is one frozen value; the
`ModelSlot` holds the current one and the scheduler calls `ModelSlot.run` once per batch, which
reads it once, so a reload swaps it in one assignment between batches and no batch mixes versions.
`LoadedModel` is what `serving.contract.ServedModel` describes to the HTTP layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from binserve.observability import metrics
from binserve.scheduling.contract import Scheduler, Tagged
from models.base import ModelAdapter


def signature_of(adapter: ModelAdapter) -> dict:
    """Output keys, per-sample shapes and dtypes on the example payload; raises if not finite."""
    if adapter.generates:
        return adapter.signature()  # what it generates varies; its warm-up checked that it runs
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


@dataclass(frozen=True)
class ServedVersion:
    """A loaded, checked version: its adapter and what it answers (keys, per-sample shapes, dtypes)."""

    adapter: ModelAdapter
    signature: dict
    #: whether the response cache may keep its deterministic replies (its `cache` setting)
    cacheable: bool = True


class ModelSlot:
    """The version of one model that batches run on now; replaced whole, between batches."""

    def __init__(self, version: ServedVersion) -> None:
        self.current = version

    def run(self, samples: list) -> Tagged:
        adapter = self.current.adapter  # read once: the whole batch runs on one version
        outputs = adapter.run_batch(samples)
        memory = adapter.runner.memory_bytes()
        if memory is not None:
            metrics.DEVICE_MEMORY.labels(str(adapter.device)).set(memory)
        return Tagged(outputs, adapter.version)


@dataclass
class LoadedModel:
    """A served model: its slot (current version) and the scheduler that feeds it (a
    `serving.contract.ServedModel`, which is what the HTTP layer sees of it)."""

    name: str
    slot: ModelSlot
    scheduler: Scheduler

    @property
    def adapter(self) -> ModelAdapter:
        """The served version's adapter."""
        return self.slot.current.adapter

    @property
    def signature(self) -> dict:
        """The served version's outputs: key -> (per-sample shape, dtype)."""
        return self.slot.current.signature

    @property
    def cacheable(self) -> bool:
        """Whether the served version's replies may come from the response cache."""
        return self.slot.current.cacheable

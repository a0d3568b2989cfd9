"""The capability server of one worker: its configuration, and the batcher that runs its batches.

design: one request batcher (binserve/scheduling/batcher.py) whose samples are texts with their
capabilities and whose batch function is `CapabilityExecutor`: `batch_timeout` is its wait for a
fuller batch, `batch_size` its texts per batch, `max_queue_samples` its queue. Requests larger than
a batch are split and re-joined by the batcher, as for any model.
"""

from __future__ import annotations

from binserve.capabilities.config import CapabilityConfig
from binserve.capabilities.executor import CapabilityExecutor
from binserve.config import ServerConfig
from binserve.scheduling.batcher import Batcher
from binserve.scheduling.contract import BatchSettings


class CapabilityService:
    """`config` (a checked CapabilityConfig) served on `manager`'s models through one batcher."""

    def __init__(self, capabilities: CapabilityConfig, settings: ServerConfig, manager) -> None:
        self.config = capabilities
        self.executor = CapabilityExecutor(capabilities, manager, settings.max_length)
        batch = BatchSettings(max_batch_size=settings.batch_size, max_wait_ms=settings.batch_timeout * 1000.0)
        self.batcher = Batcher(self.executor, batch, max_queue_samples=settings.max_queue_samples, name="classify")

    @classmethod
    def configured(cls, settings: ServerConfig, manager) -> CapabilityService | None:
        """The service `settings.config` names (ValueError naming a bad file's field), or None."""
        if not settings.config:
            return None
        return cls(CapabilityConfig.from_file(settings.config), settings, manager).start()

    def start(self) -> CapabilityService:
        self.batcher.start()
        return self

    def close(self) -> None:
        self.batcher.close()

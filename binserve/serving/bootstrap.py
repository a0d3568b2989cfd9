"""Worker bootstrap: what a Gunicorn worker sets up before its app serves a request.

design: not route code. A worker takes its CPU threads (its share of the cores, `coreshare`), its
device (a GPU per worker index when there are several) and a model manager that loads the
configured models in the background; the app answers /readyz 503 until they are warm.
"""

from __future__ import annotations

import logging
import os

from binserve.config import ServerConfig
from binserve.process.runtime import configure_threads, select_device
from binserve.serving.manager import ModelManager

log = logging.getLogger("binserve")


def start_worker(config: ServerConfig) -> ModelManager:
    """Threads and device for this worker, and its model manager (loading in the background)."""
    worker_index = int(os.environ.get("BINSERVE_WORKER_INDEX", "0"))
    configure_threads(config, worker_index)
    device = select_device(config, worker_index)
    if not config.flash_attention:
        import torch

        # one process-wide switch: scaled_dot_product_attention's flash kernel, on the CPU as on CUDA
        torch.backends.cuda.enable_flash_sdp(False)
    if config.gpu_memory:
        if device.type == "cuda":
            import torch

            torch.cuda.set_per_process_memory_fraction(config.gpu_memory, device)
        else:
            log.warning("gpu_memory %.2f has no effect: this worker serves on the %s", config.gpu_memory, device)
    return ModelManager(config, device).start(background=True)

"""Process-level torch settings: which device a worker uses and how many CPU threads torch gets.

design: measured on the project's 2-core machines, two processes each running torch with 2
intra-op threads collapse throughput about 10x (their OpenMP threads spin against each other), so
each worker gets the cores it may really use divided by the number of workers. CUDA is touched
only here, after Gunicorn forked the worker; worker i takes GPU i mod N.
"""

from __future__ import annotations

import os

import torch

from config import ServerConfig


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(config: ServerConfig) -> int:
    """Set torch's intra-op threads for this worker; returns the number set."""
    n = config.torch_threads or max(1, usable_cores() // config.workers)
    torch.set_num_threads(n)
    return n


def select_device(config: ServerConfig, worker_index: int = 0) -> torch.device:
    """The device this worker serves on: config's choice, or a GPU by worker index when 'auto'/'cuda'."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if config.device.startswith("cuda:"):
        return torch.device(config.device)
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device("cuda", worker_index % torch.cuda.device_count())

"""How a model version should run, and what one engine is.

design: `RuntimeSettings` is what the operator asked for (runtime, precision, the accuracy gate's
thresholds, where derived files are cached); `native` says which precisions this device computes
natively (emulated bf16 is slower than fp32, so it is never a candidate); an `Engine` is a function
from collated host arrays to output host arrays, named for the plan (`torch-bf16`, `onnx-int8`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from binserve.config import GENERATION_BACKENDS, PRECISIONS, RUNTIMES

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RuntimeSettings:
    """How a model version should run: from the server's flags, overridden by the version's settings."""

    runtime: str = "auto"
    precision: str = "auto"
    #: the accuracy gate: embeddings' smallest cosine to fp32; classifiers' largest probability error;
    #: arrays' tolerances (numpy.allclose)
    min_cosine: float = 0.999
    max_prob_error: float = 0.01
    rtol: float = 1e-2
    atol: float = 1e-3
    #: where ONNX exports are cached (None: a per-host temporary directory)
    cache_dir: str | None = None
    #: causal LMs: what generates (binserve/engines/generation.py), and the Python that exports for OpenVINO
    generation_backend: str = "loop"
    export_python: str = ""
    #: whether torch.compile is a candidate
    compile: bool = True

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.generation_backend not in GENERATION_BACKENDS:
            choices, got = GENERATION_BACKENDS, self.generation_backend
            raise ValueError(f"generation_backend must be one of {choices}, got {got!r}")
        if not 0 < self.min_cosine <= 1 or self.max_prob_error < 0 or self.rtol < 0 or self.atol < 0:
            raise ValueError("min_cosine must be in (0, 1]; max_prob_error, rtol and atol >= 0")


def native(precision: str, device: torch.device) -> bool:
    """Whether `device` computes in `precision` natively (emulated bf16 is slower than fp32)."""
    if precision in ("fp32", "int8"):
        return precision == "fp32" or device.type == "cpu"
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if precision == "bf16":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


class Engine:
    """One way to run a batch: `engine(host_arrays) -> output_arrays`."""

    def __init__(self, name: str, fn: Callable[[dict], dict]) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.fn(host)


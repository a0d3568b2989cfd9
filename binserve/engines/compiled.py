"""torch.compile (Inductor) as an engine: compiled at load, never on the request path.

design: the adapter's torch module (bf16 weights, or fp32) is compiled with dynamic shapes, then run
on the shapes the plan gates and times - a batch of varied lengths and a single row, since Dynamo
compiles a batch of one apart from larger ones - so every graph a request needs is compiled before
the first request. From then on the engine calls the compiled module through `torch._dynamo.run`,
which runs the graphs already compiled and never compiles: an input no graph's guards accept runs
eagerly instead of stalling a batch for the tens of seconds a compile takes. Inductor keeps what
it builds in its own on-disk caches (FX graphs and kernels, keyed by graph, torch version and CPU;
`TORCHINDUCTOR_CACHE_DIR`, by default under the system's temporary directory), so a reload, a
restart or a sibling worker finds its kernels built; and once a plan's record says the compiled
engine was slower, later loads do not build it at all (engines/plans.py). The first compile of
MiniLM takes 25-50 s on the 2-core Xeon; a candidate that cannot compile here (no C++ compiler
in the image) is "not available", like any runtime that cannot run the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: the precisions a compiled candidate runs in: bf16 as torch runs it (cast weights or autocast), or fp32
PRECISIONS = ("fp32", "bf16")


def compile_module(module: torch.nn.Module, warm: Callable[[object], None]) -> Callable:
    """`module` compiled with dynamic shapes, `warm(compiled)` run to compile every graph it needs, and
    the callable that serves: the compiled graphs only, eager where none applies."""
    compiled = torch.compile(module, dynamic=True)
    warm(compiled)
    return torch._dynamo.run(compiled)

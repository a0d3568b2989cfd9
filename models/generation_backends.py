"""Which backend generates for a causal LM, and the check each must pass before it serves.

design: the backends share one contract (`scheduling.streams.GenerationStreams`): binserve's own
loop (`loop`, transformers on torch: every device, every sampling option, the fallback) and
OpenVINO GenAI's continuous batching on the CPU (`openvino`). `auto` takes OpenVINO on a CPU
where it installs, exports and passes its check, else the loop, and says why in the log and in
`/models` (`backend_note`). Like the encoders' accuracy gate, the check runs at load on the
model's own warm-up prompts, greedy: an fp32 engine must give exactly the loop's fp32 tokens; a
bf16 engine the same first `BF16_AGREE` tokens of every prompt (bf16 rounding may flip a near-tie
later, as it does for transformers' own bf16). An engine that fails it does not serve: `auto` falls
back (bf16, then fp32, then the loop); a backend asked for by name fails the load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from binserve.scheduling.sequences import SamplingParams, Sequence

log = logging.getLogger("binserve.models")

#: what /models and the schedulers' stats call each backend
BACKEND_TYPES = {"loop": "binserve-loop", "openvino": "openvino-genai"}
#: greedy tokens per check prompt; a bf16 engine must agree on the first BF16_AGREE of them
CHECK_TOKENS = 16
BF16_AGREE = 8
CHECK_TIMEOUT_S = 120.0


@dataclass
class Choice:
    """The backend a model generates on: its kind, precision, exported path, and why it was chosen."""

    kind: str  # "loop" or "openvino"
    precision: str = "fp32"
    path: str | None = None
    note: str = ""


def greedy(backend, prompts: list[list[int]], n: int = CHECK_TOKENS) -> list[list[int]]:
    """Each prompt's first `n` greedy tokens on a started backend (EOS not special: all n come)."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    seqs = [backend.submit_sequence(Sequence(list(p), params, time.monotonic() + CHECK_TIMEOUT_S)) for p in prompts]
    for s in seqs:
        for _ in s.stream(CHECK_TIMEOUT_S):
            pass
    return [s.output for s in seqs]


def agrees(precision: str, got: list[list[int]], reference: list[list[int]]) -> bool:
    """Whether an engine's greedy tokens pass the check against the loop's fp32 tokens."""
    need = CHECK_TOKENS if precision == "fp32" else BF16_AGREE
    return all(g[:need] == r[:need] for g, r in zip(got, reference, strict=True))


def candidates(asked_precision: str, bf16_native: bool) -> list[str]:
    """OpenVINO precisions to try, fastest first: bf16 where the CPU computes it natively."""
    if asked_precision in ("fp32", "bf16"):
        return [asked_precision]
    return ["bf16", "fp32"] if bf16_native else ["fp32"]

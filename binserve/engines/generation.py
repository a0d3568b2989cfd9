"""Which backend generates for a causal LM, and the check each must pass before it serves.

design: the backends share one contract (`scheduling.streams.GenerationStreams`): binserve's own
loop (`loop`, transformers on torch: every device, every sampling option, the fallback) and
OpenVINO GenAI's continuous batching on the CPU (`openvino`). `auto` takes OpenVINO on a CPU
where it installs, exports and passes its check, else the loop, and says why in the log and in
`/models` (`backend_note`). Like the encoders' accuracy gate, the check runs at load on the
model's check prompts: the engine generates greedily, and the fp32 torch model scores its tokens
teacher-forced (one forward of prompt + tokens). Every token the engine chose must be the fp32
model's most likely one, or within `TOLERANCE` nats of it: a near-tie that another summation order
(fp32) or bf16 rounding may flip. Measured on a random-weight 8 x 512 Llama, whose logits are
nearly flat: fp32 flipped one near-tie of 64 tokens (3e-4 nats), bf16 two (at most 0.010 nats);
its top two candidates are typically 0.04-0.08 nats apart, and a wrong token is nats away.
Exact token equality, the first version of this check, failed that model in both precisions. An
engine that fails does not serve: `auto` falls back (bf16, then fp32, then the loop); a backend
asked for by name fails the load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from binserve.scheduling.openvino_genai import MIN_BF16_THREADS
from binserve.scheduling.sequences import SamplingParams, Sequence

log = logging.getLogger("binserve.models")

#: what /models and the schedulers' stats call each backend
BACKEND_TYPES = {"loop": "binserve-loop", "openvino": "openvino-genai"}
#: greedy tokens per check prompt
CHECK_TOKENS = 16
CHECK_TIMEOUT_S = 120.0
#: how much less likely (nats, under the fp32 model) than its most likely token an engine's greedy
#: token may be, per precision
TOLERANCE = {"fp32": 1e-3, "bf16": 0.05}


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


def max_gap(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """The largest log-probability gap, under `model` (torch, teacher-forced), between its most
    likely token and the token an engine chose, over every position of every output."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for prompt, out in zip(prompts, outputs, strict=True):
            if not out:
                continue
            logits = model(torch.tensor([prompt + out], device=model.device)).logits[0, len(prompt) - 1 : -1]
            lsm = torch.log_softmax(logits.float(), -1)
            chosen = lsm.gather(1, torch.tensor(out, device=lsm.device)[:, None])[:, 0]
            worst = max(worst, float((lsm.max(-1).values - chosen).max()))
    return worst


def passes(precision: str, gap: float) -> bool:
    """Whether an engine whose tokens are at most `gap` nats off the fp32 model's best passes."""
    return gap <= TOLERANCE[precision]


def candidates(asked_precision: str, bf16_native: bool, threads: int) -> list[str]:
    """OpenVINO precisions to try, fastest first: bf16 where the CPU computes it natively and the
    engine gets two threads or more (`openvino_genai.MIN_BF16_THREADS` says why)."""
    if asked_precision in ("fp32", "bf16"):
        return [asked_precision]
    return ["bf16", "fp32"] if bf16_native and threads >= MIN_BF16_THREADS else ["fp32"]

"""Which engines a model version is tried on: the operator's settings against what the device computes.

design: a candidate is a (runtime, precision) pair. torch fp32 is the reference every candidate is
compared with, so it is never a candidate itself; torch runs no int8 (ONNX Runtime's dynamic
quantization is the int8 engine); torch.compile (`compile`) is tried in one precision when any
will do - bf16 where it is native, else fp32 - since each compile costs tens of seconds at the
first load, and not at all when the operator turned it off; ONNX Runtime and OpenVINO run here on
the CPU only (ONNX Runtime in fp32 and int8, OpenVINO in fp32 and bf16); a precision the device
does not compute natively is skipped, since emulating it is slower than fp32. "auto" means every
runtime, or every precision, that applies. What is skipped is named with the reason, for GET
/models; pairs that do not exist (torch int8, OpenVINO fp16) are named only when the operator asked
for that precision.
"""

from __future__ import annotations

import torch

from binserve.engines.compiled import PRECISIONS as COMPILED
from binserve.engines.openvino import HINTS
from binserve.engines.settings import native

ALL_RUNTIMES = ("torch", "compile", "onnx", "openvino")
ALL_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "compile": COMPILED, "onnx": ("fp32", "int8"),
               "openvino": tuple(HINTS)}  # fmt: skip
_NAMES = {"compile": "torch.compile", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}


def plan_candidates(
    runtime: str, precision: str, device: torch.device, compile: bool = True
) -> tuple[list[tuple[str, str]], list]:
    """The (runtime, precision) pairs to gate and time, and (name, why) for each one skipped."""
    runtimes = ALL_RUNTIMES if runtime == "auto" else (runtime,)
    precisions = ALL_PRECISIONS if precision == "auto" else (precision,)
    chosen, skipped = [], []
    for rt in runtimes:
        for p in precisions:
            name = f"{rt}-{p}"
            if name == "torch-fp32":
                continue  # the reference itself
            if rt == "compile" and not compile:
                if p in COMPILED and (p == precision or p == _compiled_precision(device)):
                    skipped.append((name, "torch.compile is off here (torch_compile false; --disable-compile)"))
                continue
            if rt == "compile" and precision == "auto" and p != _compiled_precision(device):
                continue  # a compile costs tens of seconds: only the precision torch runs fastest here
            if p not in _PRECISIONS[rt]:
                if precision != "auto":  # asked for: say which runtimes do not run it
                    skipped.append((name, f"{_NAMES.get(rt, rt)} runs {'/'.join(_PRECISIONS[rt])} here, not {p}"))
            elif rt in ("onnx", "openvino") and device.type != "cpu":
                skipped.append((name, f"{_NAMES[rt]} runs on the CPU here, not on {device}"))
            elif not native(p, device):
                skipped.append((name, f"{p} is not native on this {device.type}"))
            else:
                chosen.append((rt, p))
    return chosen, skipped


def _compiled_precision(device: torch.device) -> str:
    """The one precision torch.compile is tried in when any will do: bf16 where it is native, else fp32."""
    return "bf16" if native("bf16", device) else "fp32"

"""Runtimes and precisions: the engines one model version can run on.

design: an engine is a function from collated host arrays to output host arrays. The candidates are
torch in fp32, bf16 or fp16 and ONNX Runtime in fp32 or int8 (CPU), limited to what the hardware
computes natively (bf16 on CPUs with avx512_bf16/AMX and on GPUs that support it; fp16 on GPUs) and
to what the operator asked for (`runtime`, `precision`: "auto" means every one that applies). At
load, each candidate passes an accuracy gate - its outputs on varied inputs, as a batch and alone,
compared with torch fp32 by the adapter (embeddings: cosine; classifiers: argmax and probability
error; arrays: tolerances) - or is not used; models/plans.py times those that pass and gives every
batch size to the fastest, and keeps checking that choice while serving. ONNX exports (and their
int8 quantization) and the plan's record are cached beside the version, so reloads and restarts
load them in a second.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from binserve.config import GENERATION_BACKENDS, PRECISIONS, RUNTIMES
from binserve.process.runtime import compute_threads, current_threads, thread_counts

log = logging.getLogger("binserve.engines")

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_EXPORT_VERSION = "binserve-onnx-1"  # bump when the exported wrapper or its settings change


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
    #: causal LMs: what generates (models/generation_backends.py), and the Python that exports for OpenVINO
    generation_backend: str = "loop"
    export_python: str = ""

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


# --- ONNX Runtime ----------------------------------------------------------------------------------


def cache_key(model_dir: str | Path, *parts: str) -> str:
    """A key for derived files: the model files' names, sizes and mtimes, the tool versions, `parts`."""
    import onnxruntime

    h = hashlib.sha256()
    for p in sorted(Path(model_dir).rglob("*")):
        if p.is_file() and ".cache" not in p.parts:
            st = p.stat()
            h.update(f"{p.relative_to(model_dir)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"{torch.__version__};{onnxruntime.__version__};{_EXPORT_VERSION};{';'.join(parts)}".encode())
    return h.hexdigest()[:24]


def machine_key(device: torch.device) -> str:
    """What engine timings depend on besides the model: the processor, the threads, the device."""
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return hashlib.sha256(f"{cpu};{gpu};{compute_threads()};{device}".encode()).hexdigest()[:12]


def load_record(path: Path) -> dict:
    """A plan record saved by an earlier load (empty when there is none or it is unreadable)."""
    try:
        raw = json.loads(path.read_text())
        return raw if isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()) else {}
    except (OSError, ValueError):
        return {}


def save_record(path: Path, record: dict) -> None:
    """Keep a plan record for the next load (best effort: a read-only cache just measures again)."""
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass


def cached_path(cache_dir: str | None, name: str) -> Path:
    """Where a derived file lives: the version's cache directory if writable, else a host temp cache."""
    for base in (cache_dir, os.path.join(tempfile.gettempdir(), "binserve-cache")):
        if not base:
            continue
        try:
            os.makedirs(base, exist_ok=True)
            if os.access(base, os.W_OK) or os.path.exists(os.path.join(base, name)):
                return Path(base, name)
        except OSError:
            continue
    raise OSError("no writable cache directory for ONNX exports")


@contextlib.contextmanager
def exclusive(path: Path):
    """One process at a time makes (or measures for) `path`: workers load a version at the same moment.

    On a read-only cache (a replica mounting the repository read-only, whose files the writer made)
    the lock file cannot be created: it is opened read-only if the writer left one (flock needs no
    write access), else nothing is locked - nothing will be written there either.
    """
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet():
    """The exporter's tracer warnings and the quantizer's root-logger advice are not ours to print."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export_onnx(
    module: torch.nn.Module, example: tuple, names_in: list[str], names_out: list[str], dynamic: dict, path: Path
) -> Path:
    """Export (a copy of) `module` to `path` unless it is there; written whole or not at all.

    The copy matters: tracing leaves state behind in the traced module (a live BERT model answered
    differently for padded batches after being exported itself).
    """
    with exclusive(path):
        if path.exists():
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with torch.inference_mode(False), torch.no_grad(), _quiet():
                torch.onnx.export(
                    copy.deepcopy(module).float().eval(),
                    example,
                    str(tmp),
                    input_names=names_in,
                    output_names=names_out,
                    dynamic_axes=dynamic,
                    opset_version=17,
                    dynamo=False,
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def quantize_int8(fp32_path: Path, path: Path, exclude: Callable[[str], bool]) -> Path:
    """Dynamic int8 with per-channel weights, leaving out the MatMuls `exclude` names (cached)."""
    with exclusive(path):
        if path.exists():
            return path
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        skipped = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and exclude(n.name)]
        with tempfile.TemporaryDirectory(dir=path.parent) as work:  # the quantizer writes files beside its input
            src = Path(work, "model.onnx")
            shutil.copyfile(fp32_path, src)
            with _quiet():
                quantize_dynamic(str(src), str(Path(work, "int8.onnx")), per_channel=True,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=skipped)  # fmt: skip
            os.replace(Path(work, "int8.onnx"), path)
    return path


def ort_engine(name: str, path: Path, names_in: list[str], names_out: list[str]) -> Engine:
    """ONNX Runtime on the CPU, with a session for each thread count a batch can be given here."""
    import onnxruntime as ort

    def session(threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The pool's threads spin between the ops of a run (waking a sleeping thread for each of
        # MiniLM's ~100 parallel ops costs more than the op), and stop spinning when the run ends, so
        # they do not steal the cores request threads need between batches. Measured on the 2-core
        # Xeon at batch 1 with 2 ms between runs: 4.3 ms, against 5.2 ms never spinning and 3.8-4.4 ms
        # spinning on after the run at 1.65 cores busy (1.32 here).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        # The CPU arena keeps the largest batch's memory for ever; plain malloc gives it back after a
        # big request (binserve.process.memory.configure_allocator), and costs these models nothing measurable.
        so.enable_cpu_mem_arena = False
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {n: session(n) for n in thread_counts()}

    def run(host: dict) -> dict:
        sess = sessions.get(current_threads()) or sessions[max(sessions)]
        outs = sess.run(names_out, {k: host[k] for k in names_in})
        return dict(zip(names_out, outs, strict=True))

    return Engine(name, run)

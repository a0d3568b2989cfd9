"""OpenVINO on the CPU: a version's ONNX export converted once to OpenVINO's IR, compiled per thread count.

design: OpenVINO reads the same ONNX export ONNX Runtime runs (engines/onnx.py), so the adapter's
exportable module is the one definition of the graph; the conversion to IR is cached like the export
(keyed by it and by OpenVINO's version) and written whole. The IR's weights file is memory-mapped
when compiled, so the workers of a host share those pages. Each candidate compiles the IR with an
inference-precision hint (fp32, or bf16 where the CPU computes it natively: AMX and avx512_bf16 run
bf16 matmuls at twice fp32's rate or more) and one compiled model per thread count a batch can be
given in this worker (binserve.process.runtime), as ONNX Runtime keeps one session per count.
OpenVINO pins no threads to cores here: the host's other workers and the request threads share them.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from binserve.engines.cache import exclusive
from binserve.engines.settings import Engine
from binserve.process.runtime import current_threads, thread_counts

#: the precisions an OpenVINO candidate is compiled in, as its inference-precision hint names them
HINTS = {"fp32": "f32", "bf16": "bf16"}
_IR_VERSION = "binserve-ov-1"  # bump when the conversion's settings change
#: a batch of more input elements than this (e.g. 32 rows of 128 tokens) gives its intermediate memory
#: back when it ends. OpenVINO keeps a request's buffers sized for the largest batch it ran (MiniLM:
#: ~380 MB after one batch of 32 x 256 tokens), which a worker would then hold for ever. Allocating
#: them again costs the next such batch 9-30% (MiniLM bf16, 2 threads: 32 x 128 tokens 135 -> 154 ms,
#: 16 x 256 184 -> 239 ms): paid only by batches this large, against hundreds of MB held idle.
RELEASE_ABOVE_ELEMENTS = 4096
#: input shapes whose prepared kernels a compiled model keeps (see `ov_engine`)
RUNTIME_CACHE_SHAPES = 128

_core = None
_core_lock = threading.Lock()


def core():
    """The process's one OpenVINO Core (it holds the plugin and its thread pools)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def ir_name(key: str) -> str:
    """The IR's file name for a version's export cache key: with OpenVINO's version, since the IR is its format."""
    import openvino

    return f"{key}-openvino-{openvino.__version__.split('-')[0]}-{_IR_VERSION}.xml"


def convert(onnx_path: Path, path: Path) -> Path:
    """OpenVINO's IR (`path`, .xml, with its .bin beside it) of an ONNX export, unless it is there.

    Weights stay fp32 in the file (no fp16 compression): the precision is chosen when compiling.
    The .bin is renamed into place before the .xml, so an .xml that exists has its weights.
    """
    with exclusive(path):
        if path.exists():
            return path
        import openvino

        with tempfile.TemporaryDirectory(dir=path.parent) as work:
            tmp = Path(work, "model.xml")
            openvino.save_model(core().read_model(str(onnx_path)), str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp, path)
    return path


def ov_engine(name: str, ir_path: Path, precision: str, names_in: list[str], names_out: list[str]) -> Engine:
    """The IR compiled for the CPU in `precision`, once per thread count; one infer request per thread."""
    if precision not in HINTS:
        raise ValueError(f"OpenVINO candidates are {sorted(HINTS)}, not {precision}")

    def compiled(threads: int):
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,  # one batch at a time per compiled model: the batch thread's
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # the cores are shared with the other workers and the request threads
            # Kernels prepared per input shape, least recently used first out: by default 5000 of them, up to
            # ~2.3 MB each for MiniLM, and varied requests make thousands of shapes (rows x padded length):
            # 600 such batches grew a process by 1.6 GB. Short texts make ~100 shapes once lengths are padded
            # to a multiple of 8 (models/hf_encoder.py), which 128 holds: as fast as caching every shape.
            "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_SHAPES,
        }
        return core().compile_model(str(ir_path), "CPU", config)

    models = {n: compiled(n) for n in thread_counts()}
    local = threading.local()

    def run(host: dict) -> dict:
        threads = current_threads()
        model = models.get(threads) or models[max(models)]
        requests = local.__dict__.setdefault("requests", {})
        request = requests.get(threads)
        if request is None:
            request = requests[threads] = model.create_infer_request()
        # inputs are read in place (the call is synchronous); outputs are copied out of the request's
        # buffers, which its next call reuses
        inputs = {k: host[k] for k in names_in}
        result = request.infer(inputs, share_inputs=True, share_outputs=False)
        outputs = {k: result[k] for k in names_out}
        if max(v.size for v in inputs.values()) > RELEASE_ABOVE_ELEMENTS:
            model.release_memory()
        return outputs

    return Engine(name, run)

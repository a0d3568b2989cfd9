"""ONNX Runtime: the export of a model version, its int8 quantization, and sessions to run it.

design: the adapter's exportable module (`OnnxSpec`) is exported once per version and tool versions
(binserve/engines/cache.py), quantized from that export when int8 is a candidate, and run by one session per
thread count a batch can be given in this worker (binserve.process.runtime), so a batch given half
the cores runs on a session built for half.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from binserve.engines.cache import exclusive
from binserve.engines.settings import Engine
from binserve.process.runtime import current_threads, thread_counts


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

"""A causal LM exported for OpenVINO GenAI, once per model version, tools and machine, and cached
like the encoders' ONNX exports.

design: the export is optimum-intel's (`optimum-cli export openvino --task
text-generation-with-past`): the stateful model, its tokenizer and detokenizer as OpenVINO models,
which is what `ContinuousBatchingPipeline` loads. optimum-intel pins its own transformers (older
than binserve's), so it runs in an environment of its own (`make openvino-genai` builds
.venv-ovexport), as a subprocess at load time - never on the request path. Weights are exported
in fp32; the precision is chosen when the pipeline compiles (its inference-precision hint), so one
export serves every precision. Workers loading the same version at once export it once
(`exclusive`); a finished export is renamed into place whole, so a crash leaves no half export.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from binserve.engines.cache import cache_key, cached_path, exclusive

log = logging.getLogger("binserve.models")

#: bump when the export's command or settings change
_EXPORT_VERSION = "binserve-ov-genai-1"
EXPORT_TIMEOUT_S = 900
#: the export environment `make openvino-genai` builds, beside server.py
DEFAULT_ENV = Path(__file__).resolve().parents[2] / ".venv-ovexport"  # the checkout's, beside .venv


class ExportUnavailable(RuntimeError):
    """The model cannot be exported here (no export environment, or the export failed): the message says why."""


def export_python(configured: str = "") -> Path:
    """The export environment's Python: the configured one, else .venv-ovexport's."""
    python = Path(configured) if configured else DEFAULT_ENV / "bin" / "python"
    if not python.is_file():
        raise ExportUnavailable(
            f"no OpenVINO export environment at {python} (`make openvino-genai` builds it, or set "
            "openvino_export_python)"
        )
    return python


def export_for_genai(model_dir: str | Path, cache_dir: str | None, python: Path) -> Path:
    """The exported directory of `model_dir` (made now if it is not cached)."""
    import openvino

    key = cache_key(model_dir, _EXPORT_VERSION, openvino.__version__, str(python))
    out = cached_path(cache_dir, f"{key}-openvino-genai")
    with exclusive(out):
        if (out / "openvino_model.xml").is_file():
            return out
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cli = python.parent / "optimum-cli"
        cmd = [str(cli), "export", "openvino", "--model", str(model_dir), "--task", "text-generation-with-past",
               "--weight-format", "fp32", str(tmp)]  # fmt: skip
        log.info("exporting %s for OpenVINO GenAI (once per version and tools)", model_dir)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportUnavailable(f"the OpenVINO export could not run: {exc}") from None
        if done.returncode != 0 or not (tmp / "openvino_model.xml").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            log.error("OpenVINO export of %s failed:\n%s", model_dir, (done.stderr or done.stdout)[-4000:])
            raise ExportUnavailable(f"the OpenVINO export failed (exit {done.returncode}): {' | '.join(tail)}")
        os.replace(tmp, out)
    return out

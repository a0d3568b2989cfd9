"""The GPU check's steps, called one process each by bench/gpu_check.sh (its header says how to run it).

design: the shell script owns the clock (one `timeout` per step, a total under 8 minutes on the
device) and the processes (every server a phase starts is killed by its process group when the
phase ends, however it ends); this module owns what each step does and the one summary:
- `carried` / `wheels-needed`: the pure-Python wheels the device lacks (flask, gunicorn and their
  own missing needs), pinned as here, and which of the carried ones to install there;
- `pack DIR`: MiniLM's config, tokenizer and pooling files (no weights) from the installed package;
- `prereqs`: what must hold before any clock-heavy step (imports, CUDA, bf16, disk, the files);
- `build`: the models (bench/gpu_models.py); `phase NAME`: one phase (bench/gpu_phases.py);
- `report`: `summary.json` in $OUT with every figure, each target met or missed, and tables.
Top-level imports are the standard library only: `wheels-needed` runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what the device's image lacks (or may hold at other versions) for a server and its tests
CARRIED = ("flask", "werkzeug", "itsdangerous", "blinker", "gunicorn", "prometheus-client")
#: what every step imports (after the carried wheels are installed)
NEEDED = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "requests", "flask", "werkzeug",
          "gunicorn", "prometheus_client", "pytest", "pytest_timeout")  # fmt: skip
DISK_GB = {"gpu": 8, "dry": 1}  # the ~0.5B Llama is 2.3 GB in fp32, and each server caches its plans


def carried() -> list[str]:
    """`name==version` of each carried package, as installed here (the project's own pins)."""
    return [f"{name}=={metadata.version(name)}" for name in CARRIED]


def wheels_needed(folder: Path) -> list[str]:
    """The carried wheels whose package is missing here or at another version (to install)."""
    out = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            out.append(str(wheel))
    return out


def pack(dst: Path) -> None:
    from bench.gpu_models import copy_model_files
    from models.registry import default_minilm_path

    copy_model_files(Path(default_minilm_path()), dst)


def machine(mode: str) -> dict:
    """What ran the check: GPU, driver, torch, CUDA, CPU, cores, Python."""
    import torch

    info = {
        "mode": mode,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cores": os.cpu_count(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"),
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        r = subprocess.run(query, capture_output=True, text=True)
        info["gpu"] = r.stdout.strip() if r.returncode == 0 else f"nvidia-smi failed: {r.stderr.strip()[:200]}"
    return info


def prereqs(mode: str, files: Path, work: Path) -> list[str]:
    """What is wrong before the clock-heavy steps start (empty: go); records the machine."""
    problems = []
    for name in NEEDED:
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            problems.append(f"cannot import {name}: {exc!r}")
    for name in ("config.json", "tokenizer.json", "modules.json"):
        if not (files / name).is_file():
            problems.append(f"{files}/{name} is missing: run `bash bench/gpu_check.sh --prepare` here first")
    free_gb = shutil.disk_usage(work).free / 2**30
    if free_gb < DISK_GB[mode]:
        problems.append(f"{work} has {free_gb:.1f} GB free; the models need {DISK_GB[mode]} GB")
    if not problems:
        import torch

        if mode == "gpu" and not torch.cuda.is_available():
            problems.append("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        elif mode == "gpu" and not torch.cuda.is_bf16_supported():
            problems.append(f"{torch.cuda.get_device_name()} does not compute bf16")
        (work / "machine.json").write_text(json.dumps(machine(mode), indent=1))
    return problems


def run_phase(name: str, mode: str, work: Path, limit_s: float) -> int:
    from bench import gpu_phases

    profile = gpu_phases.PROFILES[mode]
    models = {k: Path(v) for k, v in json.loads((work / "models.json").read_text()).items()}
    started = time.monotonic()
    try:
        if name == "tests":
            figures = gpu_phases.phase_tests(profile, models, work, limit_s)
            ok = figures["exit"] == 0 and (figures["skipped"] == 0 or mode == "dry")
        else:
            figures, ok = gpu_phases.PHASES[name](profile, models), True
        result = {"status": "ok" if ok else "failed", **figures}
    except BaseException as exc:  # SystemExit from the SIGTERM of `timeout` too: say what was cut short
        result = {"status": "failed", "error": repr(exc)[:2000]}
    result["seconds"] = round(time.monotonic() - started, 1)
    gpu_phases.write(work / f"phase-{name}.json", result)
    return 0 if result["status"] == "ok" else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("carried", "wheels-needed", "pack", "prereqs", "build", "phase", "report"))
    ap.add_argument("arg", nargs="?", help="wheels-needed: the wheel folder; pack: the target; phase: its name")
    ap.add_argument("--mode", choices=("gpu", "dry"), default="gpu")
    ap.add_argument("--files", type=Path, help="MiniLM's files (pack's output)")
    ap.add_argument("--work", type=Path, help="the run's work directory")
    ap.add_argument("--out", type=Path, help="where report writes summary.json")
    ap.add_argument("--limit", type=float, default=300.0, help="phase: its time limit in seconds")
    a = ap.parse_args()
    # `timeout` stops a step with SIGTERM: unwind (servers stopped by their `with`) instead of dying
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum} (time limit)"))
    if a.step == "carried":
        print(" ".join(carried()))
    elif a.step == "wheels-needed":
        print(" ".join(wheels_needed(Path(a.arg))))
    elif a.step == "pack":
        pack(Path(a.arg))
    elif a.step == "prereqs":
        problems = prereqs(a.mode, a.files, a.work)
        for p in problems:
            print(f"prerequisite missing: {p}", file=sys.stderr)
        (a.work / "prereqs.json").write_text(json.dumps(problems))
        return 1 if problems else 0
    elif a.step == "build":
        from bench.gpu_models import build
        from bench.gpu_phases import PROFILES

        models = build(a.files, a.work / "models", PROFILES[a.mode].sizes)
        (a.work / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    elif a.step == "phase":
        return run_phase(a.arg, a.mode, a.work, a.limit)
    else:
        from bench.gpu_report import report

        return report(a.mode, a.work, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

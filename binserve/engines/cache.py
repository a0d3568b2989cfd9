"""Files derived from a model version, and the locks that make each of them once.

design: an export, a quantized copy, a compiled blob or a plan record is keyed by the version's files
(names, sizes, mtimes), the versions of the tools that made it and what it was made with, so a new
version or a new tool makes a new file and nothing is ever stale. Files live beside the version when
its cache directory is writable, else in a per-host temporary cache; each is written whole (a
temporary name, then a rename) by one process at a time (`exclusive`), since the workers of a server
load a version at the same moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from binserve.process.runtime import compute_threads

_EXPORT_VERSION = "binserve-onnx-1"  # bump when the exported wrapper or its settings change


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


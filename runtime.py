"""Process-level torch settings: which device a worker uses and how many CPU threads torch gets.

design: measured on the project's 2-core machines, two processes each running torch with 2
intra-op threads collapse throughput about 10x (their OpenMP threads spin against each other), so
each worker gets the cores it may really use - the affinity mask, capped by the container's CPU
quota from its cgroup - divided by the number of workers. CUDA is touched
only here, after Gunicorn forked the worker; worker i takes GPU i mod N.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
from pathlib import Path

import numpy as np
import torch

from config import ServerConfig


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def configure_allocator(arenas: int = 2, mmap_threshold_bytes: int = 4 * 1024 * 1024) -> bool:
    """Make glibc give freed memory back, for a worker that must return to its baseline after a big request.

    Each of gthread's request threads would otherwise get its own malloc arena (up to 8 per core),
    each keeping its freed pages; and glibc's mmap threshold rises after every large free (up to
    32 MiB), after which large bodies and batches come from the heap and stay there. Fixing the
    threshold keeps allocations of `mmap_threshold_bytes` and more on mmap (returned to the OS on
    free); smaller ones are trimmed by `trim_heap`. Call before the request threads start.
    Returns False where the C library is not glibc.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    ok = _LIBC.mallopt(_M_ARENA_MAX, arenas) == 1
    ok &= _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
    ok &= _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold_bytes) == 1
    return bool(ok)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them mapped unless asked)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs this process's cgroup may use by its CFS quota (a container's CPU limit); None if unlimited.

    cgroup v2: `cpu.max` ("<quota> <period>" or "max <period>") of this process's cgroup and its
    ancestors, the smallest; cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` of the cpu
    controller's group (-1: unlimited). A container usually sees its own cgroup as the root.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    limits = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy: walk up from the process's group
            group = Path(root, rel)
            while True:
                limits.append(_quota_v2(group / "cpu.max"))
                if group == Path(root) or Path(root) not in group.parents:
                    break
                group = group.parent
        elif "cpu" in controllers.split(","):
            for base in (Path(root, controllers), Path(root, "cpu"), Path(root, "cpu,cpuacct")):
                if base.is_dir():
                    limits.append(_quota_v1(base / rel))
                    break
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def _quota_v2(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(group: Path) -> float | None:
    try:
        quota = int((group / "cpu.cfs_quota_us").read_text())
        period = int((group / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cores() -> int:
    """Cores this process may use: the affinity mask, capped by the cgroup CPU quota (a container's
    limit), rounded up. A 2-CPU pod on a 64-core node is 2, not 64."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def configure_threads(config: ServerConfig) -> int:
    """Set torch's intra-op threads for this worker; returns the number set."""
    n = config.torch_threads or max(1, usable_cores() // config.workers)
    torch.set_num_threads(n)
    return n


def select_device(config: ServerConfig, worker_index: int = 0) -> torch.device:
    """The device this worker serves on: config's choice, or a GPU by worker index when 'auto'/'cuda'."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if config.device.startswith("cuda:"):
        return torch.device(config.device)
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device("cuda", worker_index % torch.cuda.device_count())


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype autocast uses on `device` for a config setting; None means no autocast.

    Only CUDA autocasts: bf16 where the GPU supports it (else fp16), fp16 when asked, off when asked.
    CPU inference stays float32 (CPU autocast to bf16 is slower than fp32 on most CPUs).
    """
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class DeviceRunner:
    """Moves collated batches to the device, runs the model there, and brings outputs back.

    design (GPU): each batch is collated straight into reusable pinned host buffers (one per input
    name and slot, grown when a batch needs more, never `pin_memory()` per request); the copy to
    the device is `non_blocking` on a copy stream, and the compute stream waits on the copy's event
    rather than the host waiting; the model runs on the compute stream under inference_mode and
    autocast; outputs come back once per batch into pinned buffers and the host synchronises only
    on that copy's event. Two slots alternate, so collating batch k+1 never writes into buffers
    that batch k's copy may still be reading. (CPU): the same calls, with plain arrays and no
    streams: `staging` gives a fresh array that torch uses without a copy.
    """

    def __init__(self, device: torch.device, autocast: str = "bf16") -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.autocast = autocast_dtype(autocast, device)
        self._slot = 0
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)

    def next_batch(self) -> None:
        """Start a new batch: switch to the other staging slot."""
        self._slot ^= 1

    def _pinned(self, key: str, nbytes: int) -> torch.Tensor:
        buf = self._buffers.get((self._slot, key))
        if buf is None or buf.numel() < nbytes:
            # grow geometrically, so a few large batches do not re-pin memory every time
            size = max(nbytes, 2 * buf.numel() if buf is not None else 0, 1 << 16)
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._buffers[(self._slot, key)] = buf
        return buf

    def staging(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A host array to collate input `name` into (pinned and reused on a GPU)."""
        dtype = np.dtype(dtype)
        if not self.cuda:
            return np.empty(shape, dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self._pinned("in:" + name, nbytes)[:nbytes].numpy().view(dtype).reshape(shape)

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device tensors for collated host arrays; on a GPU the copy is queued, not waited for."""
        if not self.cuda:
            return {k: torch.from_numpy(a) for k, a in arrays.items()}
        with torch.cuda.stream(self.copy_stream):
            tensors = {k: torch.from_numpy(a).to(self.device, non_blocking=True) for k, a in arrays.items()}
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        self.compute_stream.wait_event(copied)
        for t in tensors.values():
            t.record_stream(self.compute_stream)  # the allocator must not reuse them before compute ends
        return tensors

    def forward(self, fn, *args, **kwargs):
        """Run `fn` on the compute stream under inference_mode and the configured autocast."""
        stream = torch.cuda.stream(self.compute_stream) if self.cuda else contextlib.nullcontext()
        amp = (
            torch.autocast(device_type="cuda", dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with stream, torch.inference_mode(), amp:
            return fn(*args, **kwargs)

    def to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Outputs as numpy arrays owned by the caller; floats come back as float32."""
        if not self.cuda:
            return {k: (t.float() if t.is_floating_point() else t).numpy() for k, t in tensors.items()}
        out = {}
        with torch.cuda.stream(self.compute_stream):
            for k, t in tensors.items():
                t = t.float() if t.is_floating_point() else t
                host = self._pinned("out:" + k, t.numel() * t.element_size())
                view = host[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                view.copy_(t, non_blocking=True)
                out[k] = view
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        done.synchronize()  # the one wait per batch: the reply needs these bytes
        # copy out of the pinned slot, which the batch after next will overwrite
        return {k: v.numpy().copy() for k, v in out.items()}

    def memory_bytes(self) -> int | None:
        """Device memory held by torch's allocator (None on the CPU)."""
        return int(torch.cuda.memory_allocated(self.device)) if self.cuda else None

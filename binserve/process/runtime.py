"""Process-level torch settings: which device a worker uses and how many CPU threads torch gets.

design: measured on the project's 2-core machines, two processes each running torch with 2
intra-op threads collapse throughput about 10x (their OpenMP threads spin against each other), so
each worker gets the cores it may really use - the affinity mask, capped by the container's CPU
quota from its cgroup - divided by the number of workers. CUDA is touched
only here, after Gunicorn forked the worker; worker i takes GPU i mod N.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from binserve.config import ServerConfig
from binserve.process import coreshare
from binserve.process.coreshare import (  # noqa: F401 - re-exported: where callers look for them
    cgroup_cpu_limit,
    usable_cores,
)

_compute_threads = 0  # the most threads a batch may use in this worker (configure_threads)
_adaptive = False  # share the cores with the other workers' running batches (coreshare)
_workers = 1
_worker_index = 0
_thread_state = threading.local()


def configure_threads(config: ServerConfig, worker_index: int = 0) -> int:
    """Decide this worker's compute threads; returns the most a batch may use.

    torch_threads = 0 (the default): a batch uses the cores (affinity and cgroup quota) divided by
    the batches running at that moment in all workers of the host - all of them when it runs alone
    (coreshare.py says why). A number: every batch uses that many.
    """
    global _compute_threads, _adaptive, _workers, _worker_index
    _adaptive = config.torch_threads == 0
    _compute_threads = config.torch_threads or usable_cores()
    _workers, _worker_index = coreshare.worker_count(config.workers), worker_index
    torch.set_num_threads(_compute_threads)
    _thread_state.threads = _compute_threads
    return _compute_threads


def compute_threads() -> int:
    """The most intra-op threads a batch may use in this worker (torch and ONNX Runtime alike)."""
    return _compute_threads or torch.get_num_threads()


def thread_counts() -> list[int]:
    """Every thread count a batch of this worker can be given (ONNX Runtime keeps a session for each)."""
    if not _adaptive:
        return [compute_threads()]
    return sorted({max(1, compute_threads() // active) for active in range(1, _workers + 1)}, reverse=True)


def current_threads() -> int:
    """The threads the calling thread's batch may use now."""
    return getattr(_thread_state, "threads", 0) or compute_threads()


def _apply(n: int) -> None:
    # OpenMP keeps the thread count per thread: torch.set_num_threads in the main thread does not
    # bind a batcher thread, whose parallel regions (oneDNN's among them) would use every core.
    if getattr(_thread_state, "threads", 0) != n:
        torch.set_num_threads(n)
        _thread_state.threads = n


def in_compute_thread() -> None:
    """Apply the worker's full thread count in the calling thread (loading, warm-up), once per thread."""
    if _compute_threads:
        _apply(_compute_threads)


def in_fresh_thread(fn, *args):
    """Run `fn(*args)` on a new thread and wait for it; its result, or its exception raised here.

    Why: libgomp (torch's OpenMP) keeps a team of worker threads for every thread that ever ran a
    parallel region, until that thread exits, and once it manages more threads than there are
    cores it stops spinning between regions (its "throttled" spin count): every parallel op of
    every team then pays a futex wake-up. Measured on the 2-core dev machine: a 32 x 256 @ 256 x
    1024 matmul takes 80-95 us on the only team and 180-200 us once a second, idle team exists.
    Loading, planning and warming a model run many parallel ops; on the long-lived watcher thread
    (or a request thread) they would leave such a team behind and slow every batch thread for
    good. On a thread of their own, the team ends when the work does."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"{threading.current_thread().name}-compute")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@contextlib.contextmanager
def batch_threads():
    """Run one batch with this worker's share of the cores; yields the thread count it got."""
    if not _adaptive or not _compute_threads:
        in_compute_thread()
        yield current_threads()
        return
    with coreshare.share(_compute_threads, _worker_index) as n:
        _apply(n)
        yield n


def select_device(config: ServerConfig, worker_index: int = 0) -> torch.device:
    """The device this worker serves on: config's choice, or a GPU by worker index when 'auto'/'cuda'."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if config.device.startswith("cuda:"):
        return torch.device(config.device)
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")
    gpus = [int(g) for g in config.gpu_list.replace(" ", "").split(",") if g] or list(range(torch.cuda.device_count()))
    return torch.device("cuda", gpus[worker_index % len(gpus)])


class DeviceRunner:
    """Moves collated batches to the device, runs the model there, and brings outputs back.

    design (GPU): each batch is collated straight into reusable pinned host buffers (one per input
    name and slot, grown when a batch needs more, never `pin_memory()` per request); the copy to
    the device is `non_blocking` on a copy stream, and the compute stream waits on the copy's event
    rather than the host waiting; the model runs on the compute stream under inference_mode and
    the autocast its engine asks for (binserve/engines/); outputs come back once per batch into
    pinned buffers and the host synchronises only on that copy's event. Two slots alternate, so
    collating batch k+1 never writes into buffers that batch k's copy may still be reading.
    (CPU): the same calls, with plain arrays and no streams: `staging` gives a fresh array that
    torch uses without a copy. (GPU, `pinned=False`, the `pinned_staging` setting off): pageable
    arrays copied and computed on the default stream, the way a plain `tensor.to("cuda")` server
    does it; kept so that one run can measure what pinning and streams are worth.
    """

    def __init__(self, device: torch.device, pinned: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        #: pinned staging and copy/compute streams (GPU only)
        self.pinned = self.cuda and pinned
        self._slot = 0
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        if self.pinned:
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
        if not self.pinned:
            return np.empty(shape, dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self._pinned("in:" + name, nbytes)[:nbytes].numpy().view(dtype).reshape(shape)

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device tensors for collated host arrays; on a GPU the copy is queued, not waited for."""
        if not self.cuda:
            return {k: torch.from_numpy(a) for k, a in arrays.items()}
        if not self.pinned:  # a synchronous copy from pageable memory, on the default stream
            return {k: torch.from_numpy(a).to(self.device) for k, a in arrays.items()}
        with torch.cuda.stream(self.copy_stream):
            tensors = {k: torch.from_numpy(a).to(self.device, non_blocking=True) for k, a in arrays.items()}
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        self.compute_stream.wait_event(copied)
        for t in tensors.values():
            t.record_stream(self.compute_stream)  # the allocator must not reuse them before compute ends
        return tensors

    def forward(self, fn, *args, autocast: torch.dtype | None = None):
        """Run `fn(*args)` on the compute stream under inference_mode, and autocast to `autocast` if given."""
        stream = torch.cuda.stream(self.compute_stream) if self.pinned else contextlib.nullcontext()
        amp = (
            torch.autocast(device_type=self.device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with stream, torch.inference_mode(), amp:
            return fn(*args)

    def to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Outputs as numpy arrays owned by the caller; floats come back as float32."""
        if not self.pinned:  # on a GPU, .cpu() copies to pageable memory and waits
            return {k: (t.float() if t.is_floating_point() else t).cpu().numpy() for k, t in tensors.items()}
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

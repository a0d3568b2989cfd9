"""How a worker gives memory back to the OS: glibc's allocator settings and heap trims.

design: a worker must return to its baseline after a large request (README, "Memory returns").
glibc keeps freed pages mapped unless told otherwise, so the worker fixes the allocator's
thresholds once, before its request threads start, and trims the heap after large requests.
Only ctypes: the HTTP layer calls `trim_heap` without loading torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util


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

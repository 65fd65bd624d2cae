"""Keep freed CPU memory in the process, so large activations are not page-faulted in every step.

PyTorch allocates CPU tensors with the C library's malloc. glibc serves blocks over 32 MB (e.g. a
batch of 128 × 64 × 32 × 32 float activations, 33.5 MB) with a fresh mmap and returns them to the
kernel on free, so every training step zero-fills and faults those pages in again: on VGG8 at
width 0.25 that is ~13% of a single-threaded step (bench/throughput.py). PyTorch's own advice is
to preload jemalloc or tcmalloc; where neither is installed, glibc's `mallopt` gets the same
effect with no install: serve large blocks from the heap (M_MMAP_MAX = 0) and never trim it
(M_TRIM_THRESHOLD), so a training process keeps its peak working set, as a caching allocator does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int): "do not give memory back"

_applied = False


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Apply the setting to this process once; returns whether it took. Off glibc (e.g. macOS)
    nothing changes. With jemalloc or tcmalloc preloaded the call is harmless: they serve malloc."""
    global _applied
    if _applied:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not _applied:
        log.debug("mallopt refused; CPU memory is returned to the OS on free")
    return _applied


"""CPU memory-allocator tuning for glibc systems.

glibc's default ``malloc`` serves every allocation above a (dynamic) threshold of at most 32 MB with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A ViT-B/16 forward on CPU allocates and frees tensors of
tens to hundreds of MB at every layer, so each of them page-faults its memory in again: ``vlprompt bench``'s
allocator section measured evaluation 1.2x faster with the heap serving everything (``docs/benchmarks.md``).

:func:`tune_cpu_allocator` applies that setting to the running process through ``mallopt`` (no restart needed,
unlike ``GLIBC_TUNABLES``): no ``mmap`` for allocations, and freed heap memory is returned to the system only when
more than 1 GiB of it is free at the top of the heap. The ``vlprompt`` command calls it at start; set
``VLPROMPT_MALLOC=default`` to keep glibc's behaviour. It does nothing on other C libraries, or when the user
already set ``GLIBC_TUNABLES`` or preloads another allocator (``LD_PRELOAD``, e.g. jemalloc).

The price: freed memory stays with the process, so its resident size stays near its peak (as with PyTorch's
CUDA caching allocator). A process that moves from a memory-hungry phase to another, or that starts children
which need the memory, calls :func:`release_memory` in between (``vlprompt bench`` does, between its
configurations).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30


def _glibc():
    """The C library if it is glibc on Linux, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator() -> bool:
    """Make glibc serve large allocations from the heap and keep freed memory; return whether it was applied."""
    if os.environ.get("VLPROMPT_MALLOC", "").lower() == "default":
        return False
    if "GLIBC_TUNABLES" in os.environ or "LD_PRELOAD" in os.environ:  # the user chose an allocator setting
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def release_memory() -> bool:
    """Return the free pages of the heap to the system (glibc ``malloc_trim(0)``); whether any were released.

    Safe to call at any time; a no-op (False) off glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))

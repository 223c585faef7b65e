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


def tune_cpu_allocator() -> bool:
    """Make glibc serve large allocations from the heap and keep freed memory; return whether it was applied."""
    if os.environ.get("VLPROMPT_MALLOC", "").lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or "LD_PRELOAD" in os.environ:  # the user chose an allocator setting
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

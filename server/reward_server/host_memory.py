"""Keep freed host memory in the process for the next step (glibc malloc), instead of handing it back.

A step on a CPU allocates and frees tens of MiB of activations per layer. With glibc's defaults the
freed pages went back to the kernel (the heap's top trimmed, large chunks unmapped), and the next
allocation faulted them in again, zeroed page by page. Inside the python backend's stub this cost the
engine 3.3 million minor page faults per run of the long mix and 13 % of its time (bench checkpoint,
2-core CPU, 2026-11-27: 26.5 s a run, 23.1 s with the thresholds below, where the engine in-process
took 22.4-23.0 s). Raising both thresholds keeps the pages: the process holds its largest step's
memory once it has needed it, which a server does anyway at its next large step.

glibc only (`mallopt`); elsewhere this does nothing. Env equivalents for other processes:
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # chunks below this come from the heap (a step's largest activation is well below)
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept up to this


def keep_freed_memory() -> bool:
    """Set this process's malloc thresholds (above); False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

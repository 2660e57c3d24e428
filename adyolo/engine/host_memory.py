"""Keep freed host memory in the process, so that a training step does not fault its memory in again.

glibc's malloc gives freed memory back to the kernel (the top of a heap beyond `M_TRIM_THRESHOLD`,
and every block it placed with mmap beyond the adaptive `M_MMAP_THRESHOLD`). A CPU training step frees
its activations at its end and allocates them again in the next, so each step faulted the same pages in
again, zeroed by the kernel: tens of thousands of page faults a step on the embedded default. With
trimming off (up to 2 GiB of free heap) and blocks up to glibc's largest mmap threshold (32 MiB) kept in
the heap, the same step faults about a hundred pages (docs/measurements.md).

The cost is that the process keeps its peak heap, which the step reaches again at once anyway. Other
C libraries (musl) and other operating systems have no `mallopt`; there this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD_MAX = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Stop glibc's malloc in this process from returning freed memory to the kernel (see the module
    docstring). Returns whether it applied (False off Linux or without glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold is set first because setting it also fixes the
    # trim threshold's adaptive default, which the second call then replaces.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX))
